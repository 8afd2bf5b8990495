"""``make demo``: train two small digits CNNs, one of them deliberately flawed, and diagnose both.

Everything is offline and takes well under three minutes on two CPU cores:

1. train the digits CNN well (batch 32, 15 epochs) and a flawed sibling with far
   too large a batch (512: the same 15 epochs give 16× fewer, noisier-free steps, so
   the optimiser's "temperature" is too low and the network is under-trained), each
   from two seeds (the second seed feeds the failure-mode diagnosis);
2. run ``nndiag diagnose good.pt flawed.pt --data digits?split=test --second-seed ...``;
3. write ``nndiag-demo/report.html`` and ``nndiag-demo/report.json`` and print the top
   findings.

Examples
--------
``python -m nndiag.demo [OUT_DIR]``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

#: (file stem, batch size, description) of the two models the demo trains.
MODELS = (
    ("cnn_good", 32, "batch 32"),
    ("cnn_bigbatch", 512, "batch 512: too large a batch, too few steps"),
)
EPOCHS = 15
LR = 0.05
#: Lighter settings than the defaults, to stay within the demo's time budget on 2 cores.
DEMO_OPTIONS = {"hessian.n_samples": 128, "hessian.top_k": 2, "hessian.slq_runs": 1,
                "hessian.slq_steps": 30, "hessian.trace_probes": 20,
                "landscape.steps": 11, "mdtree.hessian_samples": 64, "mdtree.curve_epochs": 2}


def train_models(out_dir: Path, *, progress: bool | None = None) -> dict[str, dict[str, object]]:
    """Train the demo's models (two seeds each) and save their checkpoints under ``out_dir``.

    Returns
    -------
    dict
        Per model stem: ``path``, ``second_seed`` (paths), ``train_accuracy``,
        ``test_accuracy``, ``steps``.
    """
    from nndiag._utils.seeding import fork_rng
    from nndiag._utils.training import accuracy, train_classifier
    from nndiag.io.data import load_data
    from nndiag.models import build_model

    train, test = load_data("digits?split=train"), load_data("digits?split=test")
    out: dict[str, dict[str, object]] = {}
    for stem, batch, what in MODELS:
        info: dict[str, object] = {}
        for seed in (0, 1):
            with fork_rng(seed):
                model = build_model("digits-cnn")
            log = train_classifier(model, train, epochs=EPOCHS, batch_size=batch, lr=LR, seed=seed,
                                   progress=progress, description=f"training {stem} (seed {seed})")
            path = out_dir / (f"{stem}.pt" if seed == 0 else f"{stem}_seed{seed}.pt")
            torch.save(model.state_dict(), path)
            if seed == 0:
                info.update(path=path, train_accuracy=log.train_accuracy,
                            test_accuracy=accuracy(model, test), steps=log.steps, what=what)
            else:
                info["second_seed"] = path
        out[stem] = info
    return out


def main(out: str = "nndiag-demo", probes: str | None = None) -> int:
    """Run the demo; returns the process exit code.

    Parameters
    ----------
    out : str
        Output folder (created).
    probes : str, optional
        Restrict the analyses (comma-separated), e.g. for a quick check.
    """
    from nndiag._utils.threads import limit_threads
    from nndiag.cli.app import app

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # one thread: these networks are tiny, and on a busy 2-core machine two BLAS threads
    # made training ~10x slower (measured), not faster
    with limit_threads(1):
        models = train_models(out_dir)
    for stem, info in models.items():
        print(f"trained {stem} ({info['what']}): {info['steps']} steps, train acc "
              f"{info['train_accuracy']:.3f}, test acc {info['test_accuracy']:.3f}", file=sys.stderr)
    print(f"training took {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    args = ["diagnose", *[str(i["path"]) for i in models.values()], "--arch", "digits-cnn",
            "--data", "digits?split=test", "--train-data", "digits?split=train", "--threads", "1",
            *[a for k, v in DEMO_OPTIONS.items() for a in ("-o", f"{k}={v}")]]
    for info in models.values():
        args += ["--second-seed", str(info["second_seed"])]
    args += ["--html", str(out_dir / "report.html"), "--json", str(out_dir / "report.json")]
    if probes:
        args += ["--probes", probes]
    print(f"$ nndiag {' '.join(args)}", file=sys.stderr)
    t1 = time.perf_counter()
    try:
        code = app(args, standalone_mode=False)
    except SystemExit as exc:  # pragma: no cover - typer.Exit in standalone mode
        code = exc.code
    code = int(code or 0)
    print(f"diagnosis took {time.perf_counter() - t1:.1f}s; total {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    print(f"\nopen {(out_dir / 'report.html').resolve()} in a browser", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
