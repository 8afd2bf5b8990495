"""Load a page in headless Chromium (selenium + the Debian ``chromium-driver``) and inspect it.

The browser tests skip only when Chromium truly is unavailable; under CI (``CI`` set)
a missing browser is a failure, since ``make test`` installs it (``make sysdeps``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver")


def _find(candidates: tuple[str, ...]) -> str | None:
    for c in candidates:
        p = shutil.which(c) or (c if os.path.isabs(c) and os.access(c, os.X_OK) else None)
        if p:
            return p
    return None


def require_chromium() -> tuple[str, str]:
    """Paths of the Chromium binary and its driver; skip (or fail under CI) without them."""
    browser, driver = _find(_BROWSERS), _find(_DRIVERS)
    missing = [n for n, p in (("chromium", browser), ("chromium-driver", driver)) if p is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install 'nndiag[dev]')")
    if missing:
        msg = f"headless browser test needs {', '.join(missing)} (make sysdeps installs Chromium)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return browser, driver  # type: ignore[return-value]


_INSPECT_JS = """
const imgs = Array.from(document.images).map(i => ({
  alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
  shownW: i.getBoundingClientRect().width, shownH: i.getBoundingClientRect().height}));
const sections = Array.from(document.querySelectorAll('section')).map(s => ({
  id: s.id, cls: s.className, probe: s.dataset.probe || null,
  h: s.getBoundingClientRect().height,
  heading: (s.querySelector('h2,h3') || {textContent: ''}).textContent.trim()}));
const data = document.getElementById('nndiag-report');
return {title: document.title, imgs: imgs, sections: sections,
        figureErrors: document.querySelectorAll('.figure-error').length,
        json: data ? data.textContent : null,
        scrollHeight: document.documentElement.scrollHeight,
        bodyText: document.body.innerText.length};
"""


def inspect_page(page: Path, screenshot: Path, width: int = 1280) -> dict[str, Any]:
    """Open ``page`` in headless Chromium, save a full-page screenshot, return what rendered.

    Returns a dict with ``imgs`` (natural sizes), ``sections``, ``figureErrors``, the
    embedded ``json`` text, and ``console`` (browser log entries at SEVERE/WARNING).
    """
    browser, driver_path = require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium-manager reach a network
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},900", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.set_page_load_timeout(60)
        drv.get(page.resolve().as_uri())
        out = drv.execute_script(_INSPECT_JS)
        chrome = int(drv.execute_script("return window.outerHeight - window.innerHeight") or 0)
        height = min(int(out["scrollHeight"]), 16000)
        drv.set_window_size(width, height + chrome)
        drv.save_screenshot(str(screenshot))
        out["console"] = [e for e in drv.get_log("browser") if e.get("level") in ("SEVERE", "WARNING")]
    finally:
        drv.quit()
    return out
