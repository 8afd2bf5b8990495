"""``nndiag hessian MODEL --data DATA`` and ``nndiag landscape MODEL --data DATA --out FILE.png``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from nndiag._utils.files import check_figure_path, check_writable, save_figure
from nndiag.cli.common import (
    ArchOpt,
    DataOpt,
    Device,
    DeviceOpt,
    FailOn,
    FailOnOpt,
    Format,
    FormatOpt,
    InputsOpt,
    NSamplesOpt,
    SeedOpt,
    WeightsOpt,
    emit_json,
    err,
    fail_exit_code,
    handle_errors,
    human_table,
)


class Dirs(str, Enum):
    random = "random"
    hessian = "hessian"


class Norm(str, Enum):
    filter = "filter"
    layer = "layer"
    model = "model"
    weight = "weight"
    none = "none"


class OneD(str, Enum):
    zero = "zero"
    keep = "keep"
    scale = "scale"


class Mode(str, Enum):
    eval = "eval"
    train = "train"


class Plot(str, Enum):
    contour = "contour"
    surface = "surface"


ModeOpt = Annotated[Mode, typer.Option("--mode", help="Module mode for the forward passes (BatchNorm: "
                                       "eval = running statistics, train = batch statistics).")]

DirsOpt = Annotated[Dirs, typer.Option("--directions", help="Random Gaussian or top Hessian eigenvectors.")]
OneDOpt = Annotated[OneD, typer.Option("--one-d", help="1-D parameters (biases, BatchNorm): zero, keep, scale.")]
ResumeOpt = Annotated[Path | None, typer.Option("--resume", help="Checkpoint file (.npz) to resume a big grid.")]
GridBatchOpt = Annotated[int | None, typer.Option(
    "--batch-size", help="Examples per forward (default: eval mode on a CPU: activations under 2 MiB per batch; "
    "else all).")]
AutoBatchOpt = Annotated[int | None, typer.Option(
    "--batch-size", help="Examples per forward (default: eval mode on a CPU: activations under 2 MiB per batch; "
    "else 128).")]


LossOpt = Annotated[str, typer.Option(
    "--loss", help="ce (cross-entropy on class logits), lm (next-token cross-entropy of a causal language "
                   "model on token ids: an .npz with x alone) or auto (lm for a causal LM on token data).")]


def _load(model: str, arch: str | None, weights: str | None, data: str | None, n_samples: int | None,
          seed: int, loss: str = "auto"):
    """The model (a Hugging Face folder built with its head), the data and the loss function."""
    from nndiag.errors import InputError
    from nndiag.io.data import load_data
    from nndiag.io.models import load_model
    from nndiag.landscape._setup import LOSSES

    if data is None:
        raise InputError("this command needs --data (digits, mnist1d, FILE.npz or an image folder)")
    if loss not in (*LOSSES, "auto"):
        raise InputError(f"unknown loss '{loss}'; choose auto, {', '.join(LOSSES)}")
    lm = load_model(model, weights=weights, arch=arch, hf_module=True)
    module = lm.require_module("the Hessian/landscape analysis")
    bundle = load_data(data, n_samples=n_samples, seed=seed)
    tokens = bool(bundle.meta.get("tokens"))
    if loss == "auto":
        causal = getattr(module, "display_class", type(module).__name__).endswith(("ForCausalLM", "LMHeadModel"))
        loss = "lm" if causal and tokens else "ce"
    if loss == "lm" and not tokens:
        raise InputError(f"--loss lm needs token ids: an .npz with x alone, shape (sequences, T); {bundle.name} "
                         "has labels")
    if loss == "ce" and tokens:
        raise InputError(f"{bundle.name} holds token sequences without labels: use --loss lm with a causal "
                         "language model")
    return lm, module, bundle, (None if loss == "ce" else LOSSES[loss])


def _record(res: Any, scale: Any, inputs: str) -> None:
    """The input-scale finding first among ``res``'s findings, and ``--inputs`` in its params."""
    if scale is not None:
        res.findings.insert(0, scale)
    res.params["inputs"] = inputs


def register(app: typer.Typer) -> None:
    @app.command("hessian")
    @handle_errors
    def hessian(
        model: str = typer.Argument(..., help="Model: file, folder, package.module:factory or built-in name."),
        data: DataOpt = None,
        arch: ArchOpt = None,
        weights: WeightsOpt = None,
        top_k: Annotated[int, typer.Option("--top-k", help="Largest eigenvalues to compute.")] = 1,
        bottom_k: Annotated[int, typer.Option("--bottom-k", help="Smallest eigenvalues to compute.")] = 0,
        trace: Annotated[bool, typer.Option("--trace", help="Estimate the trace.")] = False,
        density: Annotated[bool, typer.Option("--density", help="SLQ density and the LLA criteria.")] = False,
        tol: Annotated[float, typer.Option("--tol", help="Relative residual tolerance.")] = 1e-4,
        trace_rtol: Annotated[float, typer.Option("--trace-rtol", help="Target relative s.e. of the trace.")] = 1e-2,
        trace_probes: Annotated[int, typer.Option("--trace-probes", help="Most trace probes.")] = 200,
        trace_method: Annotated[str, typer.Option(
            "--trace-method", help="auto (split where it applies, else hutchpp), split, hutchpp, xtrace, "
                                   "hutchinson or exact.")] = "auto",
        hvp_engine: Annotated[str, typer.Option(
            "--hvp-engine", help="auto, double-backward or forward-over-reverse.")] = "auto",
        slq_runs: Annotated[int, typer.Option("--slq-runs", help="SLQ start vectors.")] = 3,
        slq_steps: Annotated[int, typer.Option("--slq-steps", help="Lanczos steps per SLQ run.")] = 80,
        plot: Annotated[Path | None, typer.Option("--plot", help="Write the density plot (PNG/SVG).")] = None,
        n_samples: NSamplesOpt = None,
        batch_size: AutoBatchOpt = None,
        mode: ModeOpt = Mode.eval,
        float64: Annotated[bool, typer.Option("--float64", help="Compute in double precision.")] = False,
        fmt: FormatOpt = Format.human,
        device: DeviceOpt = Device.auto,
        seed: SeedOpt = 0,
        fail_on: FailOnOpt = FailOn.never,
        loss: LossOpt = "auto",
        inputs: InputsOpt = "auto",
    ) -> int:
        """Hessian spectrum of the loss: top eigenvalues, trace, density and LLA criteria."""
        import torch

        from nndiag.landscape.spectrum import hessian_spectrum
        from nndiag.report.input_scale import prepared

        if plot is not None:
            check_figure_path(plot, "--plot picture")
        _, module, bundle, loss_fn = _load(model, arch, weights, data, n_samples, seed, loss)
        bundle, scale = prepared(module, bundle, inputs)  # checked before the analysis
        r = hessian_spectrum(module, bundle, loss=loss_fn, top_k=top_k, bottom_k=bottom_k, trace=trace, density=density,
                             batch_size=batch_size, seed=seed, tol=tol, slq_runs=slq_runs,
                             trace_rtol=trace_rtol, trace_probes=trace_probes, trace_method=trace_method,
                             slq_steps=slq_steps, mode=mode.value, device=device.value,
                             dtype=torch.float64 if float64 else torch.float32, hvp_engine=hvp_engine)
        if plot is not None:
            if r.density is None:
                err("nndiag: --plot needs --density; no plot written")
            else:
                save_figure(r.plot(), plot, dpi=120)
        res = r.to_result()
        _record(res, scale, inputs)
        if fmt is Format.json:
            doc = res.to_dict()
            doc.update({k: doc["summary"].get(k) for k in
                        ("eigenvalues", "trace", "trace_stderr", "n_samples", "criteria")})
            emit_json(doc)
        else:
            human_table(res.tables["eigenvalues"].to_dict(orient="records"), title="Hessian eigenvalues")
            s = res.summary
            if s["trace"] is not None:
                typer.echo(f"trace = {s['trace']:.6g} ± {s['trace_stderr']:.2g} (1 s.e.)")
            if s.get("criteria"):
                c = s["criteria"]
                typer.echo(f"criteria: re = {c['re']:.4g}, Kh = {c['Kh']:.4g}, Ct = {c['Ct']:.4g}")
            for f in res.findings:
                typer.echo(f"[{f.severity}] {f.code}: {f.message}")
            typer.echo(f"{s['n_samples']} samples, {s['n_params']:,} parameters, {s['n_hvp']} HVPs, "
                       f"{res.timing['total']:.2f} s")
        return fail_exit_code([f.severity for f in res.findings], fail_on)

    @app.command("landscape")
    @handle_errors
    def landscape(
        model: str = typer.Argument(..., help="Model: file, folder, package.module:factory or built-in name."),
        data: DataOpt = None,
        out: Annotated[Path | None, typer.Option("--out", help="Picture to write (PNG/SVG/PDF).")] = None,
        arch: ArchOpt = None,
        weights: WeightsOpt = None,
        dim: Annotated[int | None, typer.Option(
            "--dim", help="1 (line) or 2 (plane); default 2, or one per --toward.")] = None,
        steps: Annotated[int, typer.Option("--steps", help="Grid points per axis.")] = 21,
        span: Annotated[float, typer.Option("--span", help="Steps range over [-span, span].")] = 1.0,
        directions: DirsOpt = Dirs.random,
        norm: Annotated[Norm, typer.Option("--norm", help="Direction normalisation.")] = Norm.filter,
        one_d: OneDOpt = OneD.zero,
        plot: Annotated[Plot, typer.Option("--plot", help="2-D picture: contour or 3-D surface.")] = Plot.contour,
        grid: Annotated[Path | None, typer.Option("--grid", help="Also write the grid (.npz or .json).")] = None,
        resume: ResumeOpt = None,
        n_samples: NSamplesOpt = None,
        batch_size: GridBatchOpt = None,
        mode: ModeOpt = Mode.eval,
        fmt: FormatOpt = Format.human,
        device: DeviceOpt = Device.auto,
        seed: SeedOpt = 0,
        fail_on: FailOnOpt = FailOn.never,
        loss: LossOpt = "auto",
        toward: Annotated[list[str] | None, typer.Option(
            "--toward", help="Another checkpoint or folder of the same architecture: the line to it "
                             "(given twice: the plane through the three models).")] = None,
        inputs: InputsOpt = "auto",
    ) -> int:
        """Loss landscape around the weights: a 1-D line or 2-D plane, as a picture and a grid."""
        from nndiag.errors import InputError
        from nndiag.io.models import load_model
        from nndiag.landscape.surface import GRID_SUFFIXES, surface
        from nndiag.report.input_scale import prepared

        if out is None and grid is None and fmt is not Format.json:
            raise InputError("say where to write the result: --out FILE.png and/or --grid FILE.npz")
        # every output checked before the grid is computed: a bad path costs a second, not the grid
        if out is not None:
            check_figure_path(out, "--out picture")
        if grid is not None:
            check_writable(grid, GRID_SUFFIXES, "--grid file")
        dirs: Any = directions.value
        if toward:
            if len(toward) > 2:
                raise InputError(f"--toward takes one model (a line) or two (a plane), got {len(toward)}")
            if directions is not Dirs.random:
                raise InputError("give either --directions or --toward, not both")
            if dim is not None and dim != len(toward):
                raise InputError(f"--dim {dim} does not match {len(toward)} --toward model(s)")
            dim = len(toward)
        dim = 2 if dim is None else dim
        lm, module, bundle, loss_fn = _load(model, arch, weights, data, n_samples, seed, loss)
        bundle, scale = prepared(module, bundle, inputs)  # checked before the analysis
        if toward:
            dirs = [load_model(t) for t in toward]  # only their tensors are read
        s = surface(module, bundle, loss=loss_fn, dim=dim, steps=steps, span=span, directions=dirs,
                    norm=norm.value, one_d=one_d.value, mode=mode.value, batch_size=batch_size, seed=seed,
                    resume=resume, device=device.value, name=lm.name if toward else None)
        if grid is not None:  # the grid first: the picture is drawn from it and could fail
            s.save(grid)
        if out is not None:
            save_figure(s.plot("line" if dim == 1 else plot.value), out, dpi=120)
        res = s.to_result()
        _record(res, scale, inputs)
        if fmt is Format.json:
            emit_json(res.to_dict())
        else:
            sm = res.summary
            typer.echo(f"{dim}-D landscape, {sm['points']} points ({s.params['directions']} directions, "
                       f"{s.params['norm']} norm, {s.params['mode']} mode): origin loss {sm['origin_loss']:.4g}, "
                       f"min {sm.get('min_loss', float('nan')):.4g} at {sm.get('min_at')}, "
                       f"{res.timing['total']:.2f} s")
            for f in res.findings:
                typer.echo(f"[{f.severity}] {f.code}: {f.message}")
            if out is not None:
                typer.echo(f"wrote {out}")
        return fail_exit_code([f.severity for f in res.findings], fail_on)
