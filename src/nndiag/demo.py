"""``make demo``: build a model nndiag can analyse without downloads, then analyse it.

Trains the small digits CNN (seconds on a CPU), saves its checkpoint under
``nndiag-demo/`` and runs the analyses available so far on it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


def main(out: str = "nndiag-demo") -> int:
    """Run the demo; returns the process exit code."""
    from typer.testing import CliRunner  # noqa: F401 - keeps typer import errors early

    from nndiag._utils.seeding import fork_rng
    from nndiag._utils.threads import limit_threads
    from nndiag._utils.training import train_classifier
    from nndiag.io.data import load_data
    from nndiag.models import build_model

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with limit_threads():
        train, test = load_data("digits?split=train"), load_data("digits?split=test")
        with fork_rng(0):
            model = build_model("digits-cnn")
        log = train_classifier(model, train, epochs=15, batch_size=32, lr=0.05, seed=0,
                               progress=True, description="training digits CNN")
        from nndiag._utils.training import accuracy

        ckpt = out_dir / "digits_cnn.pt"
        torch.save(model.state_dict(), ckpt)
        print(f"trained digits CNN: train acc {log.train_accuracy:.3f}, test acc "
              f"{accuracy(model, test):.3f} ({time.perf_counter() - t0:.1f}s) -> {ckpt}", file=sys.stderr)

    from nndiag.cli.app import app

    args = ["layers", str(ckpt), "--arch", "digits-cnn"]
    print(f"$ nndiag {' '.join(args)}", file=sys.stderr)
    try:
        app(args, standalone_mode=False)
    except SystemExit as exc:  # pragma: no cover
        return int(exc.code or 0)
    print(f"\nresults in {out_dir.resolve()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
