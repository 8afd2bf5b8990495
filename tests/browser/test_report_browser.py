"""The demo's HTML report in headless Chromium: every section and image renders, no console errors.

The screenshot goes to pytest's tmp folder, or to ``$NNDIAG_SCREENSHOT_DIR`` when set
(to look at it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.browser.chromium import inspect_page, require_chromium
from tests.demo_run import demo_run

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page_state(tmp_path_factory):
    require_chromium()
    run = demo_run()
    assert run.exit_code == 0, run.stdout[-2000:]
    folder = Path(os.environ.get("NNDIAG_SCREENSHOT_DIR") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / "report.png"
    state = inspect_page(run.out / "report.html", shot)
    return run, state, shot


def test_every_section_renders(page_state):
    run, state, _ = page_state
    doc = json.loads((run.out / "report.json").read_text())
    ids = {s["id"]: s for s in state["sections"]}
    for sid in ("summary", "findings", "comparison", "runs"):
        assert ids[sid]["h"] > 20, sid
    for m in doc["models"]:
        slug = re.sub(r"[^a-z0-9]+", "-", m["name"].lower()).strip("-")
        assert ids[f"model-{slug}"]["h"] > 100
        for p in m["probes"]:  # one visible section per analysis, whatever its status
            sec = ids[f"{slug}-{p['probe']}"]
            assert sec["probe"] == p["probe"] and sec["h"] > 10
            assert p["status"] in sec["cls"]
    assert state["title"] == "nndiag report: " + ", ".join(m["name"] for m in doc["models"])


def test_every_image_loaded_and_is_visible(page_state):
    run, state, _ = page_state
    html = (run.out / "report.html").read_text()
    assert len(state["imgs"]) == html.count("<img ") >= 4  # evaluation draws 2 per model at least
    broken = [i for i in state["imgs"] if not (i["complete"] and i["w"] > 50 and i["h"] > 50)]
    assert not broken, broken
    assert all(i["shownW"] > 50 and i["shownH"] > 50 for i in state["imgs"])
    assert state["figureErrors"] == 0


def test_no_console_errors_and_the_embedded_json_is_the_report(page_state):
    run, state, _ = page_state
    assert state["console"] == []
    assert json.loads(state["json"]) == json.loads((run.out / "report.json").read_text())


def test_screenshot_saved(page_state):
    _, state, shot = page_state
    import numpy as np
    from PIL import Image

    with Image.open(shot) as im:
        w, h = im.size
        pixels = np.asarray(im.convert("RGB").resize((64, 64))).reshape(-1, 3)
    colours = len(np.unique(pixels, axis=0))
    assert w == 1280 and h >= min(state["scrollHeight"], 16000) - 4  # the whole page
    assert colours > 50  # a rendered page, not a blank one
