"""Causal language models: the next-token loss, Hugging Face outputs and token files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.landscape import hessian_spectrum, surface
from nndiag.landscape._setup import differentiable_attention, lm_loss, logits_of

transformers = pytest.importorskip("transformers")
F64 = torch.float64


def _gpt2(attention: str = "sdpa") -> torch.nn.Module:
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, n_inner=16, vocab_size=12, n_positions=6,
                                  attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, attn_implementation=attention)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _tokens(n: int = 10, t: int = 6) -> torch.Tensor:
    return torch.randint(0, 12, (n, t), generator=torch.Generator().manual_seed(1))


def test_next_token_loss_equals_the_models_own_loss():
    model, x = _gpt2(), _tokens()
    with torch.no_grad():
        out = model(x)
        assert torch.is_tensor(logits_of(out)) and logits_of(out) is out.logits
        # transformers computes its loss from float32 logits
        assert float(lm_loss(out, x)) == pytest.approx(float(model(x, labels=x).loss), rel=1e-6)
    with pytest.raises(Exception, match="next-token loss needs"):
        lm_loss(out, x[:, 0])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_hessian_of_a_causal_language_model_matches_the_dense_hessian(attention):
    model, x = _gpt2(attention), _tokens()
    before = snapshot(model)
    params = {k: p.detach() for k, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(params, torch.split(flat, sizes), strict=True))
        tensors = {k: v.view(params[k].shape) for k, v in parts.items()}
        return lm_loss(functional_call(model, tensors, (x,)), x)

    flat = torch.cat([p.flatten() for p in params.values()])
    if attention == "sdpa":  # PyTorch's fused CPU attention has no derivative of its backward
        with pytest.raises(RuntimeError, match="derivative for .*scaled_dot_product.* is not implemented"):
            torch.autograd.functional.hessian(loss_of, flat, vectorize=True)
    with differentiable_attention():  # the math kernel: the same function, differentiable twice
        dense = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat, vectorize=True))
    r = hessian_spectrum(model, (x, x), loss=lm_loss, top_k=3, bottom_k=1, trace=True, trace_method="exact",
                         dtype=F64, tol=1e-9)
    np.testing.assert_allclose(r.eigenvalues, dense.flip(0)[:3].numpy(), rtol=1e-6)
    np.testing.assert_allclose(r.bottom_eigenvalues, dense[:1].numpy(), rtol=1e-6)
    assert r.trace == pytest.approx(float(dense.sum()), rel=1e-9)
    assert r.params["loss"] == "lm_loss"
    assert same_snapshot(before, snapshot(model))


def test_landscape_origin_is_the_models_loss():
    model, x = _gpt2(), _tokens()
    before = snapshot(model)
    s = surface(model, (x, x), loss=lm_loss, steps=3, dtype=F64)
    with torch.no_grad():
        own = float(model(x, labels=x).loss)  # from float32 logits
    assert s.origin_loss == pytest.approx(own, rel=1e-6)
    assert s.losses[1, 1] == pytest.approx(s.origin_loss, rel=1e-12)
    assert same_snapshot(before, snapshot(model))


def test_token_files_and_the_cli(tmp_path):
    from typer.testing import CliRunner

    from nndiag.cli.app import app
    from nndiag.io.data import load_data

    model, x = _gpt2(), _tokens()
    model.float().save_pretrained(str(tmp_path / "lm"))
    np.savez(tmp_path / "tok.npz", x=x.numpy().astype(np.uint8))  # byte-level ids stay ids, not pixels
    b = load_data(tmp_path / "tok.npz")
    assert b.meta["tokens"] and b.x.dtype == torch.int64 and torch.equal(b.x, x) and torch.equal(b.y, x)
    np.savez(tmp_path / "labelled.npz", x=x.numpy(), y=np.zeros(len(x), dtype=np.int64))
    np.savez(tmp_path / "floats.npz", x=np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(Exception, match="'x' alone holding token ids"):
        load_data(tmp_path / "floats.npz")

    run = CliRunner().invoke
    res = run(app, ["hessian", str(tmp_path / "lm"), "--data", str(tmp_path / "tok.npz"), "--top-k", "2",
                    "--float64", "--tol", "1e-8", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["params"]["loss"] == "lm_loss"
    ref = hessian_spectrum(model.double(), (x, x), loss=lm_loss, top_k=2, dtype=F64, tol=1e-8)
    np.testing.assert_allclose(doc["eigenvalues"], ref.eigenvalues, rtol=1e-6)
    res = run(app, ["hessian", str(tmp_path / "lm"), "--data", str(tmp_path / "labelled.npz")])
    assert res.exit_code != 0 and "use the next-token loss, --loss lm" in res.output
    res = run(app, ["landscape", str(tmp_path / "lm"), "--data", str(tmp_path / "labelled.npz"), "--loss", "lm",
                    "--grid", str(tmp_path / "g.npz")])
    assert res.exit_code != 0 and "--loss lm needs token ids" in res.output
    res = run(app, ["landscape", str(tmp_path / "lm"), "--data", str(tmp_path / "tok.npz"), "--steps", "3",
                    "--grid", str(tmp_path / "g.npz"), "--format", "json"])
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        own = float(model(x, labels=x).loss)
    assert json.loads(res.stdout)["summary"]["origin_loss"] == pytest.approx(own, rel=1e-5)
    # the same tokens as one stream (a tokenised corpus), cut back into blocks of 6
    np.savez(tmp_path / "stream.npz", x=x.numpy().reshape(-1))
    res = run(app, ["landscape", str(tmp_path / "lm"), "--data", f"{tmp_path / 'stream.npz'}?block=6",
                    "--steps", "3", "--grid", str(tmp_path / "g2.npz"), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["summary"]["origin_loss"] == pytest.approx(own, rel=1e-5)


def test_diagnose_a_language_model_folder_on_token_sequences(tmp_path):
    from nndiag.report.diagnose import diagnose

    model, x = _gpt2(), _tokens(12, 6)
    model.float().save_pretrained(str(tmp_path / "lm"))
    np.savez(tmp_path / "tok.npz", x=x.numpy())
    rep = diagnose(str(tmp_path / "lm"), data=str(tmp_path / "tok.npz"),
                   options={"hessian": {"top_k": 2, "trace": False, "density": False}, "landscape": {"steps": 3}},
                   progress=False)
    runs = {r.probe: r for r in rep.models[0].runs}
    assert {n: r.status for n, r in runs.items()} == {
        "evaluation": "ok", "spectral": "ok", "hessian": "ok", "landscape": "ok",
        "mdtree": "skipped", "zerocost": "skipped", "slices": "skipped"}
    assert "token sequences" in runs["zerocost"].message
    ev = runs["evaluation"].result
    with torch.no_grad():
        out = model.float()(x, labels=x)
    z, target = out.logits[:, :-1], x[:, 1:]
    assert ev.summary["loss"] == pytest.approx(float(out.loss), rel=1e-5)
    assert ev.summary["accuracy"] == pytest.approx(float((z.argmax(-1) == target).double().mean()), abs=1e-12)
    assert ev.summary["n_tokens"] == 12 * 5
    assert ev.summary["perplexity"] == pytest.approx(np.exp(float(out.loss)), rel=1e-5)
    per_pos = ev.tables["per_position"]
    np.testing.assert_allclose(per_pos["loss"].mean(), ev.summary["loss"], rtol=1e-9)
    assert [f.code for f in runs["evaluation"].result.findings] == ["EVAL-CHANCE"]  # an untrained model
    assert runs["hessian"].result.params["loss"] == "lm_loss"
    assert runs["landscape"].result.summary["origin_loss"] == pytest.approx(float(out.loss), rel=1e-5)


def test_diagnose_a_sequence_classifier_folder(tmp_path):
    # labelled token data: every probe that runs calls model(x) and gets the logits tensor
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    model.save_pretrained(str(tmp_path / "clf"))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 30, (60, 10), generator=g), torch.randint(0, 3, (60,), generator=g)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    from nndiag.report.diagnose import diagnose

    rep = diagnose(str(tmp_path / "clf"), data=str(tmp_path / "data.npz"), probes="evaluation,zerocost,hessian",
                   options={"hessian": {"top_k": 1, "trace": False, "density": False}}, progress=False)
    assert rep.models[0].info["class"] == "BertForSequenceClassification"
    runs = {r.probe: r for r in rep.models[0].runs}
    assert {n: r.status for n, r in runs.items()} == {"evaluation": "ok", "zerocost": "ok", "hessian": "ok"}
    with torch.no_grad():
        logits = model(x).logits
    ev = runs["evaluation"].result.summary
    assert ev["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()), abs=1e-12)
    assert ev["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)


def test_a_trained_language_model_is_not_at_chance():
    # a tiny GPT-2 learns a repeating pattern in a few steps: next-token accuracy far above chance
    from nndiag.report.evaluation import run as evaluate

    model, x = _gpt2(), (torch.arange(60).reshape(10, 6) * 5 + torch.arange(10)[:, None]) % 12
    model.float().train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(60):
        opt.zero_grad()
        lm_loss(model(x), x).backward()
        opt.step()
    model.eval()
    from nndiag.io.data import as_data
    from nndiag.io.models import LoadedModel

    data = as_data((x, x))
    assert data.meta["tokens"]  # (tokens, tokens) pairs are token sequences
    with pytest.raises(Exception, match="1-D class labels, or the token ids x themselves"):
        as_data((x, (x + 1) % 12))  # per-token tags (a tagging task) are not next-token targets
    res = evaluate(LoadedModel(None, model, "lm", "module", None), data, seed=0)
    assert res.summary["accuracy"] > 0.9 and res.findings == []


def test_a_folder_transformers_cannot_build_still_gets_its_data_free_analyses(tmp_path):
    from safetensors.torch import save_file

    from nndiag.report.diagnose import diagnose

    folder = tmp_path / "odd"
    folder.mkdir()
    save_file({"enc.weight": torch.randn(32, 16), "head.weight": torch.randn(8, 32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchModel"], "model_type": "nosuch"}))
    g = torch.Generator().manual_seed(0)
    rep = diagnose(str(folder), data=(torch.randn(20, 16, generator=g), torch.randint(0, 8, (20,), generator=g)),
                   probes="spectral,evaluation", progress=False)
    runs = {r.probe: r for r in rep.models[0].runs}
    assert runs["spectral"].status == "ok" and len(runs["spectral"].result.tables["layers"]) == 2
    assert runs["evaluation"].status == "error"
    assert "needs a runnable model: " in runs["evaluation"].message and "transformers cannot build" in runs[
        "evaluation"].message


def test_slices_command_on_a_sequence_classifier_folder(tmp_path):
    from typer.testing import CliRunner

    from nndiag.cli.app import app

    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(str(tmp_path / "clf"))
    g = torch.Generator().manual_seed(2)
    np.savez(tmp_path / "data.npz", x=torch.randint(0, 30, (150, 10), generator=g).numpy(),
             y=torch.randint(0, 3, (150,), generator=g).numpy())
    res = CliRunner().invoke(app, ["slices", str(tmp_path / "clf"), "--data", str(tmp_path / "data.npz"),
                                   "--n", "2", "--size", "0.05", "--steps", "50", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["tables"]["slices"]) == 2


def test_landscape_line_between_two_language_model_folders(tmp_path):
    """``--toward`` another Hugging Face folder: the module runs wrapped (names ``model.…``),
    the folder's tensors carry the bare names; the end of the line is that model's own loss."""
    from typer.testing import CliRunner

    from nndiag.cli.app import app
    from nndiag.io.models import load_model
    from nndiag.landscape.directions import toward

    a, x = _gpt2(), _tokens()
    cfg = a.config
    torch.manual_seed(1)
    b = transformers.GPT2LMHeadModel(cfg).eval()
    a.float().save_pretrained(str(tmp_path / "a"))
    b.save_pretrained(str(tmp_path / "b"))
    np.savez(tmp_path / "tok.npz", x=x.numpy())
    res = CliRunner().invoke(app, ["landscape", str(tmp_path / "a"), "--data", str(tmp_path / "tok.npz"),
                                   "--toward", str(tmp_path / "b"), "--steps", "7", "--grid", str(tmp_path / "g.npz")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "g.npz") as f:
        losses = f["losses"]
    with torch.no_grad():
        own_a, own_b = float(a.float()(x, labels=x).loss), float(b(x, labels=x).loss)
    assert abs(own_a - own_b) > 1e-3
    assert losses[1] == pytest.approx(own_a, rel=1e-5) and losses[5] == pytest.approx(own_b, rel=1e-5)
    # the same direction from the API, against the wrapped module's names
    wrapped = load_model(tmp_path / "a", hf_module=True).module
    w = {k: p.detach() for k, p in wrapped.named_parameters()}
    assert all(k.startswith("model.") for k in w)
    d = toward(w, load_model(tmp_path / "b"))
    bw = dict(b.named_parameters())
    for k in w:
        torch.testing.assert_close(d[k], bw[k[len("model."):]].detach() - w[k])
