"""The ``nndiag`` command-line tool (typer root).

Each command lives in its own module under ``nndiag.cli`` and exposes
``register(app)``; :data:`COMMAND_MODULES` lists them.
"""

from __future__ import annotations

import importlib

import typer

import nndiag

app = typer.Typer(
    name="nndiag",
    help="Diagnose neural networks: weight spectra, loss landscapes, failure modes, "
    "zero-cost proxies and error slices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Modules that register commands (each defines ``register(app)``).
COMMAND_MODULES: list[str] = [
    "nndiag.cli.env_cmd",
    "nndiag.cli.layers_cmd",
    "nndiag.cli.data_cmd",
    "nndiag.cli.spectral_cmd",
    "nndiag.cli.smooth_cmd",
    "nndiag.cli.hessian_cmd",
    "nndiag.cli.mdtree_cmd",
    "nndiag.cli.zerocost_cmd",
    "nndiag.cli.slices_cmd",
    "nndiag.cli.diagnose_cmd",
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nndiag {nndiag.__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """nndiag: diagnose neural networks."""


for _mod in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_mod)
    except ModuleNotFoundError as _exc:  # a command family not built yet
        if _exc.name != _mod:
            raise
        continue
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    import warnings

    # PyTorch's note that a vmapped operator (e.g. CPU attention under batched Hessian probes)
    # runs through its slow fallback: the numbers are right, and the line means nothing to a user
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
