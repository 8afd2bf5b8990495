"""``nndiag slices MODEL --data DATA`` and ``nndiag slices-benchmark``: error slices."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from nndiag.cli.common import (
    ArchOpt,
    BatchOpt,
    DataOpt,
    Device,
    DeviceOpt,
    FailOn,
    FailOnOpt,
    Format,
    FormatOpt,
    NSamplesOpt,
    SeedOpt,
    WeightsOpt,
    emit_json,
    err,
    fail_exit_code,
    handle_errors,
    human_table,
)


class Method(str, Enum):
    spotlight = "spotlight"
    loss_rank = "loss_rank"
    gmm = "gmm"
    domino = "domino"


_SHOWN = ["name", "size", "members", "mean_loss", "accuracy", "accuracy_out", "class_counts",
          "top_indices", "failed"]


def _short(d: object, k: int = 4) -> str:
    if isinstance(d, dict):
        items = list(d.items())
        s = ", ".join(f"{a}:{b}" for a, b in items[:k])
        return s + (" ..." if len(items) > k else "")
    if isinstance(d, list):
        return ", ".join(str(v) for v in d[:k]) + (" ..." if len(d) > k else "")
    return str(d)


def register(app: typer.Typer) -> None:
    @app.command("slices")
    @handle_errors
    def slices(
        model: Annotated[str | None, typer.Argument(
            help="Model: file, folder, package.module:factory or built-in name. Omit with --embeddings.")] = None,
        data: DataOpt = None,
        arch: ArchOpt = None,
        weights: WeightsOpt = None,
        embeddings: Annotated[str | None, typer.Option(
            "--embeddings", help="Use these embeddings (.npz with embeddings+losses, or .npy with --losses) "
            "instead of a model.")] = None,
        losses: Annotated[str | None, typer.Option(
            "--losses", help=".npy of per-example losses for --embeddings.")] = None,
        layer: Annotated[str | None, typer.Option("--layer", help="Module whose output is the representation "
                                                  "(default: input of the final Linear).")] = None,
        method: Annotated[Method, typer.Option("--method", help="Slice-discovery method.")] = Method.spotlight,
        n: Annotated[int, typer.Option("--n", help="Number of slices.")] = 5,
        size: Annotated[float, typer.Option("--size", help="Slice size: fraction (< 1) or count.")] = 0.02,
        pca: Annotated[int | None, typer.Option(
            "--pca", help="Reduce embeddings to this many components first.")] = None,
        steps: Annotated[int, typer.Option("--steps", help="Spotlight optimisation steps.")] = 1000,
        flip: Annotated[bool, typer.Option("--flip", help="Seek regions of unusually low loss.")] = False,
        gallery: Annotated[str | None, typer.Option(
            "--gallery", help="Write pictures (gallery, PCA map) to this folder.")] = None,
        n_samples: NSamplesOpt = None,
        batch_size: BatchOpt = 256,
        fmt: FormatOpt = Format.human,
        device: DeviceOpt = Device.auto,
        seed: SeedOpt = 0,
        fail_on: FailOnOpt = FailOn.never,
    ) -> int:
        """Find groups of similar inputs on which the model fails together (the Spotlight)."""
        from nndiag._utils.threads import limit_threads
        from nndiag.errors import InputError

        if gallery is not None:  # before the slices are searched: a bad folder costs a second
            from nndiag._utils.files import check_folder

            check_folder(gallery, "--gallery folder")
        options: dict[str, object] = {}
        if method is Method.spotlight:
            options = {"pca": pca, "steps": steps, "flip": flip}
        elif method in (Method.gmm, Method.domino) and pca is not None:
            options = {"pca": pca}
        with limit_threads():
            if embeddings is not None:
                if model is not None:
                    raise InputError("give either MODEL or --embeddings, not both")
                from nndiag.slices.embeddings import load_embeddings
                from nndiag.slices.find import fit_method, slices_result

                emb = load_embeddings(embeddings, losses)
                fitted = fit_method(method.value, emb, size=size, n=n, seed=seed, **options)
                result = slices_result(emb, fitted, seed=seed,
                                       params={"embeddings": embeddings, "size": size, "n": n, **options})
            else:
                if model is None or data is None:
                    raise InputError("nndiag slices needs MODEL and --data DATA (or --embeddings FILE)")
                from nndiag._utils.device import resolve_device
                from nndiag.io.data import load_data
                from nndiag.io.models import load_model
                from nndiag.slices.find import find_slices

                dev = resolve_device(device.value)
                lm = load_model(model, weights=weights, arch=arch, hf_module=True)
                module = lm.require_module("slice discovery").to(dev)
                bundle = load_data(data, n_samples=n_samples, seed=seed)  # batches go to the model's device
                result = find_slices(module, bundle, method.value, layer=layer, size=size, n=n, seed=seed,
                                     batch_size=batch_size, **options)
        if gallery is not None:
            from pathlib import Path

            from nndiag._utils.files import save_figure
            from nndiag.slices.probe import figures

            out = Path(gallery)
            for name, fig in figures(result).items():
                err(f"wrote {save_figure(fig, out / f'{name}.png', dpi=120, bbox_inches='tight')}")
        code = fail_exit_code([f.severity for f in result.findings], fail_on)
        if fmt is Format.json:
            emit_json(result.to_dict())
            return code
        df = result.tables["slices"]
        rows = [{c: (_short(r[c]) if c in ("class_counts", "top_indices") else r[c]) for c in _SHOWN}
                for r in df.to_dict(orient="records")]
        s = result.summary
        human_table(rows, title=f"{s['method']} slices — {s['examples']} examples, layer {s['layer']}",
                    columns=_SHOWN)
        ok = df[~df["failed"]]
        if len(ok):
            top = ok.iloc[0]
            acc = "" if top["accuracy"] is None or top["accuracy"] != top["accuracy"] else \
                f", accuracy {top['accuracy']:.2f}"
            typer.echo(f"top slice: {top['name']} ({top['members']} members, mean loss "
                       f"{top['mean_loss']:.3g}{acc}; top members {_short(top['top_indices'], 5)})")
        for f in result.findings:
            typer.echo(f"[{f.severity}] {f.code}: {f.message}")
        return code

    @app.command("slices-benchmark")
    @handle_errors
    def slices_benchmark(
        dataset: Annotated[str, typer.Option(
            "--dataset", help="digits, or mnist (../shared MNIST test set).")] = "digits",
        plant: Annotated[str, typer.Option(
            "--plant", help="kmeans (largest cluster of one class) or low_ink.")] = "kmeans",
        arch: Annotated[str, typer.Option("--arch", help="mlp or cnn.")] = "mlp",
        seeds: Annotated[int, typer.Option("--seeds", help="Number of seeds (0, 1, ...).")] = 5,
        size: Annotated[float, typer.Option("--size", help="Spotlight size.")] = 0.05,
        steps: Annotated[int, typer.Option("--steps", help="Spotlight steps.")] = 600,
        n_samples: NSamplesOpt = None,
        fmt: FormatOpt = Format.human,
        fail_on: FailOnOpt = FailOn.fail,
    ) -> int:
        """Plant a systematic error in a small classifier and check that the spotlight finds it."""
        from nndiag.slices.benchmark import BenchmarkConfig, run_benchmark

        cfg = BenchmarkConfig(dataset=dataset, plant=plant, arch=arch, seeds=tuple(range(seeds)), size=size,
                              steps=steps, n_samples=n_samples)
        result = run_benchmark(cfg)
        code = fail_exit_code([f.severity for f in result.findings], fail_on)
        if fmt is Format.json:
            emit_json(result.to_dict())
            return code
        cols = ["seed", "class", "members", "base_rate", "slice_accuracy", "method", "ap", "p_at_10",
                "in_support", "collapsed", "rejected"]
        human_table(result.tables["runs"].to_dict(orient="records"), title="planted-slice benchmark",
                    columns=cols)
        for f in result.findings:
            typer.echo(f"[{f.severity}] {f.code}: {f.message}")
        return code
