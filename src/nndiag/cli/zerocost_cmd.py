"""``nndiag zerocost evaluate|rank``: zero-cost proxies at initialisation."""

from __future__ import annotations

from typing import Annotated

import typer

from nndiag.cli.common import (
    Format,
    FormatOpt,
    SeedOpt,
    emit_json,
    err,
    handle_errors,
    human_table,
)

ProxiesOpt = Annotated[str, typer.Option(
    "--proxies", help="Comma-separated proxies (gradsign, synflow, grad_norm, snip, grasp, fisher, "
                      "jacob_cov, nwot, zen, params, flops) or 'all'.")]


def register(app: typer.Typer) -> None:
    zc = typer.Typer(help="Zero-cost proxies: score untrained architectures (GradSign, SynFlow, ...).",
                     no_args_is_help=True)
    app.add_typer(zc, name="zerocost")

    @zc.command("evaluate")
    @handle_errors
    def evaluate_cmd(
        benchmark: Annotated[str, typer.Option("--benchmark", help="NB201 accuracy table (CSV).")],
        data: Annotated[str, typer.Option("--data", help="DATA spec for the scoring batch, "
                                                          "e.g. cifar10_train_5k.npz?normalize=cifar.")],
        space: Annotated[str, typer.Option("--space", help="Search space.")] = "nb201",
        sample: Annotated[int, typer.Option("--sample", help="Number of random architectures.")] = 100,
        proxies: ProxiesOpt = "gradsign,synflow",
        batch_size: Annotated[int, typer.Option("--batch-size", help="Examples in the batch.")] = 64,
        workers: Annotated[int, typer.Option("--workers", help="Worker processes.")] = 1,
        cache: Annotated[str | None, typer.Option(
            "--cache", help="JSON-lines file of finished rows; a rerun resumes from it.")] = None,
        top_k: Annotated[float, typer.Option("--top-k", help="Top fraction for the hit rate.")] = 0.1,
        fmt: FormatOpt = Format.human,
        seed: SeedOpt = 0,
    ) -> int:
        """Score N random architectures and correlate the proxies with benchmark accuracy."""
        from nndiag.zerocost.evaluate import evaluate

        res = evaluate(benchmark, data, space=space, sample=sample, seed=seed, proxies=proxies,
                       batch_size=batch_size, workers=workers, cache=cache, top_k=top_k)
        corr = res.tables["correlations"]
        if fmt is Format.json:
            doc = res.to_dict()
            per_proxy: dict[str, dict] = {}
            for _, r in corr.iterrows():
                d = per_proxy.setdefault(r["proxy"], {"spearman": {}, "kendall": {},
                                                      "top_k_hit_rate": {}, "n": {}})
                d["spearman"][r["dataset"]] = r["spearman"]
                d["kendall"][r["dataset"]] = r["kendall"]
                d["top_k_hit_rate"][r["dataset"]] = r["top_k_hit_rate"]
                d["n"][r["dataset"]] = int(r["n"])
            from nndiag.report.results import jsonable

            doc["proxies"] = jsonable(per_proxy)
            doc["sample_size"] = res.summary["sample_size"]
            emit_json(doc)
            return 0
        human_table(corr.to_dict(orient="records"),
                    title=f"{space}: {res.summary['scored']} of {res.summary['sample_size']} "
                          f"architectures scored (seed {seed}, batch {batch_size})")
        failed = res.tables["scores"]
        failed = failed[failed["status"] != "ok"]
        for _, r in failed.iterrows():
            err(f"failed: {r['name']}: {r['error']}")
        return 0

    @zc.command("rank")
    @handle_errors
    def rank_cmd(
        specs: Annotated[list[str], typer.Argument(help="Models: factory strings, built-in names "
                                                        "(e.g. nb201:ARCH) or checkpoints with --arch.")],
        data: Annotated[str, typer.Option("--data", help="DATA spec for the scoring batch.")],
        proxies: ProxiesOpt = "gradsign,synflow,snip,jacob_cov,nwot",
        batch_size: Annotated[int, typer.Option("--batch-size", help="Examples in the batch.")] = 64,
        arch: Annotated[str | None, typer.Option(
            "--arch", help="Architecture for weights-only files.")] = None,
        as_is: Annotated[bool, typer.Option(
            "--as-is", help="Score the loaded weights instead of a re-initialised copy.")] = False,
        fmt: FormatOpt = Format.human,
        seed: SeedOpt = 0,
    ) -> int:
        """Score candidate models at initialisation and print them ranked (1 = most promising)."""
        from nndiag.io.models import load_model
        from nndiag.report.results import Result, provenance
        from nndiag.zerocost.evaluate import batch_from
        from nndiag.zerocost.rank import rank_models
        from nndiag.zerocost.score import parse_proxies

        names = parse_proxies(proxies)
        x, y, data_name, _ = batch_from(data, batch_size, seed)
        models = []
        for spec in specs:
            lm = load_model(spec, arch=arch, hf_module=True)
            models.append((spec, lm.require_module("zerocost rank")))
        df, summary = rank_models(models, x, y, names, seed=seed, at_init=not as_is)
        result = Result("zerocost-rank", tables={"ranking": df}, summary=summary,
                        params={"proxies": names, "batch_size": batch_size, "data": data_name,
                                "at_init": not as_is}, seed=seed, meta=provenance("cpu"))
        if fmt is Format.json:
            emit_json(result.to_dict())
            return 0
        label = "re-initialised (at-initialisation scores)" if not as_is else "as loaded"
        human_table(df.drop(columns=["error"]).to_dict(orient="records"), title=f"candidates, {label}")
        for _, r in df[df["status"] != "ok"].iterrows():
            err(f"{r['name']}: {r['error']}")
        for p, why in summary["left_out"].items():
            err(f"{p}: left out of the vote, it failed on every candidate ({why})")
        agree = summary["proxy_agreement"]
        typer.echo(f"best: {summary['best']}; proxy agreement (mean Kendall τ): "
                   + (f"{agree:.2f}" if agree == agree else "n/a (needs two or more scored candidates)"))
        return 0
