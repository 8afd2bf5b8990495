"""analyze(): layer selection, model left untouched, bad inputs, streaming, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.errors import InputError
from nndiag.io.layers import describe_layers
from nndiag.io.models import load_model
from nndiag.spectral import analyze
from nndiag.spectral.metrics import layer_metrics
from nndiag.spectral.powerlaw import fit_powerlaw


def _svd2(W: torch.Tensor) -> np.ndarray:
    return np.sort(np.linalg.svd(W.detach().double().numpy(), compute_uv=False) ** 2)


def test_layers_table_has_ww_metric_names_and_reference_values():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    res = analyze(m, keep_evals=True, precision="float64")
    df = res.layers
    assert df.columns[0] == "name"
    for col in ("alpha", "alpha_weighted", "D", "xmin", "xmax", "num_pl_spikes", "sigma",
                "lambda_max", "spectral_norm", "log_spectral_norm", "norm", "log_norm",
                "log_alpha_norm", "stable_rank", "entropy", "matrix_rank", "N", "M", "Q",
                "num_evals", "rf", "warning", "status"):
        assert col in df.columns
    assert list(df["name"]) == ["0", "2"]
    np.testing.assert_allclose(res.evals["0"], _svd2(m[0].weight), rtol=1e-8)
    assert df.loc[0, "N"] == 128 and df.loc[0, "M"] == 64
    assert set(res.skipped["name"]) == {"0.bias", "2.bias"}
    assert res.summary["layers_analysed"] == 2


def test_selection_covers_attention_conv_hf_and_lora():
    class GPT2Conv1D(nn.Module):  # HF's Conv1D: weight is (in, out)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 48))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.c_attn = GPT2Conv1D()
            self.conv1d = nn.Conv1d(6, 12, 5)
            self.conv3d = nn.Conv3d(2, 4, 2)
            self.emb = nn.Embedding(100, 16)
            self.tiny = nn.Linear(4, 3)
            self.bn = nn.BatchNorm1d(8, affine=False)
            self.ln = nn.LayerNorm(16)

    torch.manual_seed(0)
    net = Net()
    sd = dict(net.state_dict())
    sd["adapter.lora_A.default.weight"] = torch.randn(4, 32)
    sd["adapter.lora_B.default.weight"] = torch.randn(24, 4)
    res = analyze(net)
    names = list(res.layers["name"])
    assert {"attn.in_proj.q", "attn.in_proj.k", "attn.in_proj.v", "attn.out_proj"} <= set(names)
    q = res.layers.set_index("name").loc["attn.in_proj.q"]
    assert q["N"] == 16 and q["M"] == 16
    c1 = res.layers.set_index("name").loc["conv1d"]
    assert c1["num_evals"] == 6 * 5 and c1["rf"] == 5  # not WeightWatcher's 5 eigenvalues
    assert res.layers.set_index("name").loc["conv3d"]["num_evals"] == 2 * 8
    assert "emb" in names
    reasons = dict(zip(res.skipped["name"], res.skipped["reason"], strict=True))
    assert reasons["tiny.weight"].startswith("too few eigenvalues")
    assert reasons["ln.weight"] == "normalisation layer parameter"
    # the fused GPT-2 c_attn splits along dim 1
    c = analyze({"h.0.attn.c_attn.weight": net.c_attn.weight.detach()})
    assert list(c.layers["name"]) == ["h.0.attn.c_attn.q", "h.0.attn.c_attn.k", "h.0.attn.c_attn.v"]
    ev_k = analyze({"h.0.attn.c_attn.weight": net.c_attn.weight.detach()}, keep_evals=True,
                   precision="float64").evals["h.0.attn.c_attn.k"]
    np.testing.assert_allclose(ev_k, _svd2(net.c_attn.weight[:, 16:32]), rtol=1e-8)
    # row-block fused projections (MPT/Phi-2 Wqkv, Baichuan W_pack, Phi-3 qkv_proj, Qwen-1's
    # Linear c_attn) split along dim 0; one with grouped K/V heads (not 3d × d) stays whole
    w = torch.randn(48, 16, generator=torch.Generator().manual_seed(3))
    for name in ("b.0.attn.Wqkv", "b.0.self_attn.W_pack", "b.0.self_attn.qkv_proj", "h.0.attn.c_attn"):
        r = analyze({f"{name}.weight": w}, keep_evals=True, precision="float64")
        assert list(r.layers["name"]) == [f"{name}.q", f"{name}.k", f"{name}.v"], name
        np.testing.assert_allclose(r.evals[f"{name}.v"], _svd2(w[32:]), rtol=1e-8)
    gqa = analyze({"b.0.self_attn.qkv_proj.weight": w[:32]})  # 16 Q rows + 2 × 8 K/V rows
    assert list(gqa.layers["name"]) == ["b.0.self_attn.qkv_proj"]
    # LoRA: B·A analysed as one matrix
    r = analyze({k: v for k, v in sd.items() if "adapter" in k}, keep_evals=True, precision="float64",
                min_evals=4)
    assert list(r.layers["name"]) == ["adapter.lora_BA"]
    ba = sd["adapter.lora_B.default.weight"] @ sd["adapter.lora_A.default.weight"]
    np.testing.assert_allclose(r.evals["adapter.lora_BA"][-4:], _svd2(ba)[-4:], rtol=1e-8)


def test_parameters_of_three_or_more_dims_outside_convolutions():
    # a ViT's position table (1, L, d) is an L×d matrix, its cls token a vector, another 3-D
    # tensor in a non-convolution module has no known layout; GPT-2's tables are
    # embeddings even with no module type (safetensors); a conv kernel with one output
    # channel stays a convolution
    class ViTish(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.randn(1, 40, 16))
            self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
            self.stack = nn.Parameter(torch.randn(4, 24, 16))
            self.time_embedding = nn.Sequential(nn.Linear(16, 32))
            self.head = nn.Conv1d(16, 1, 9)

    torch.manual_seed(0)
    net = ViTish()
    res = analyze(net, keep_evals=True, precision="float64")
    rows = res.layers.set_index("name")
    assert rows.loc["pos_embed", "kind"] == "embedding"
    assert (rows.loc["pos_embed", "N"], rows.loc["pos_embed", "M"]) == (40, 16)
    np.testing.assert_allclose(res.evals["pos_embed"], _svd2(net.pos_embed[0]), rtol=1e-8)
    assert rows.loc["time_embedding.0", "kind"] == "linear"
    assert rows.loc["head", "kind"] == "conv1d" and rows.loc["head", "num_evals"] == 9
    reasons = dict(zip(res.skipped["name"], res.skipped["reason"], strict=True))
    assert reasons["cls_token"] == "1-D tensor after dropping size-1 dimensions"
    assert reasons["stack"] == "unsupported 3-D tensor of a ViTish module, not a convolution kernel"
    # tensors alone (a safetensors file): names decide
    raw = analyze({"transformer.wte.weight": torch.randn(50, 16), "transformer.wpe.weight": torch.randn(20, 16),
                   "pos_embed": torch.randn(1, 40, 16), "conv.weight": torch.randn(1, 16, 9),
                   "time_embedding.linear_1.weight": torch.randn(32, 16),
                   "block.time_emb_proj.weight": torch.randn(32, 16), "tok_emb.weight": torch.randn(50, 16)})
    raw = raw.layers.set_index("name")
    assert list(raw["kind"]) == ["embedding", "embedding", "embedding", "conv1d", "linear", "linear", "embedding"]


def test_stacked_mixture_of_experts_weights_are_one_matrix_per_expert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 96, 32)  # (E, 2I, H): the layout this test is about
    res = analyze(model, keep_evals=True, precision="float64")
    rows = res.layers.set_index("name")
    for proj, n in (("gate_up_proj", 96), ("down_proj", 48)):
        for e in range(4):
            name = f"model.layers.0.mlp.experts.{proj}.{e}"
            assert rows.loc[name, "kind"] == "experts" and (rows.loc[name, "N"], rows.loc[name, "M"]) == (n, 32)
            np.testing.assert_allclose(res.evals[name], _svd2(getattr(experts, proj)[e]), rtol=1e-8)
    # the same tensors alone (a safetensors checkpoint: no module types)
    sd = {k: v for k, v in model.state_dict().items() if ".experts." in k}
    alone = analyze(sd, keep_evals=True, precision="float64")
    assert list(alone.layers["name"]) == [n for n in res.layers["name"] if ".experts." in n]
    for name, ev in alone.evals.items():
        np.testing.assert_array_equal(ev, res.evals[name])


def test_recurrent_weights_are_one_matrix_per_gate():
    torch.manual_seed(0)
    model = nn.ModuleDict({"lstm": nn.LSTM(12, 16, num_layers=2, bidirectional=True),
                           "gru": nn.GRU(16, 10), "rnn": nn.RNN(10, 9), "cell": nn.LSTMCell(9, 11)})
    res = analyze(model, keep_evals=True, precision="float64")
    rows = res.layers.set_index("name")
    expected = {"lstm.weight_ih_l0": (model["lstm"].weight_ih_l0, "ifgo"),
                "lstm.weight_hh_l1_reverse": (model["lstm"].weight_hh_l1_reverse, "ifgo"),
                "gru.weight_ih_l0": (model["gru"].weight_ih_l0, "rzn"),
                "cell.weight_hh": (model["cell"].weight_hh, "ifgo")}
    for tensor, (w, gates) in expected.items():
        h = w.shape[0] // len(gates)
        for g, letter in enumerate(gates):  # PyTorch stacks the gates' rows in this order
            name = f"{tensor}.{letter}"
            assert rows.loc[name, "kind"] == "recurrent" and rows.loc[name, "M"] == min(h, w.shape[1])
            np.testing.assert_allclose(res.evals[name], _svd2(w[g * h:(g + 1) * h]), rtol=1e-8)
    assert "lstm.weight_ih_l0" not in rows.index
    assert sum(n.startswith("lstm.") for n in rows.index) == 2 * 2 * 2 * 4  # layers × directions × ih/hh × gates
    # an Elman RNN has one matrix per weight (no gates)
    np.testing.assert_allclose(res.evals["rnn.weight_hh_l0"], _svd2(model["rnn"].weight_hh_l0), rtol=1e-8)
    # a state dict alone (no module types): the gate count read from weight_hh's shape
    alone = analyze(model.state_dict(), keep_evals=True, precision="float64")
    assert set(alone.evals) == set(res.evals)
    for name, ev in alone.evals.items():
        np.testing.assert_allclose(ev, res.evals[name], rtol=1e-12)


def test_nndiag_layers_agrees_with_analysis_selection():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4),
                        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True))
    lm = load_model(net)
    table = describe_layers(lm)
    res = analyze(lm)
    used = set(table.loc[table["used"], "name"])
    assert used == set(res.layers["tensor"])
    skipped = dict(zip(res.skipped["name"], res.skipped["reason"], strict=True))
    for row in table[~table["used"]].itertuples():
        assert skipped[row.name] == row.reason


def test_model_left_exactly_as_it_was():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 10))
    m.train()
    m[0].weight.requires_grad_(False)
    m(torch.randn(2, 1, 8, 8)).sum().backward()
    m.register_forward_hook(lambda *a: None)
    before = snapshot(m)
    analyze(m, mp_fit=True, randomize=True)
    assert same_snapshot(before, snapshot(m))
    assert m.training


def _quantized(t: torch.Tensor) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in torch 2.13 but still exist
        return torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)


def test_bad_inputs_give_statuses_and_findings_not_crashes():
    torch.manual_seed(0)
    good = torch.randn(64, 32)
    nan = torch.randn(64, 32)
    nan[3, 4] = float("nan")
    inf = torch.randn(40, 20)
    inf[0, 0] = float("inf")
    rank1 = torch.outer(torch.randn(64), torch.randn(32))
    sd = {
        "good.weight": good,
        "nan.weight": nan,
        "inf.weight": inf,
        "zero.weight": torch.zeros(32, 16),
        "rank1.weight": rank1,
        "row.weight": torch.randn(1, 500),
        "int.weight": torch.randint(-5, 5, (32, 32), dtype=torch.int8),
        "half.weight": torch.randn(48, 24).half(),
        "bf16.weight": torch.randn(48, 24).bfloat16(),
        "q.weight": _quantized(torch.randn(32, 16)),
    }
    res = analyze(sd)
    layers = res.layers.set_index("name")
    skipped = dict(zip(res.skipped["name"], res.skipped["reason"], strict=True))
    assert skipped["nan.weight"].startswith("non-finite") and skipped["inf.weight"].startswith("non-finite")
    assert skipped["zero.weight"] == "all-zero matrix"
    assert "1×N" in skipped["row.weight"]
    assert "non-float dtype int8" in skipped["int.weight"]
    assert layers.loc["good", "status"] == "success"
    assert layers.loc["rank1", "status"] == "failed" and layers.loc["rank1", "matrix_rank"] == 1
    for low in ("half", "bf16"):
        assert layers.loc[low, "status"] == "success"
        w = sd[f"{low}.weight"].double().numpy()
        assert layers.loc[low, "lambda_max"] == pytest.approx(np.linalg.norm(w, 2) ** 2, rel=1e-5)
    wq = sd["q.weight"].dequantize().double().numpy()
    assert layers.loc["q", "lambda_max"] == pytest.approx(np.linalg.norm(wq, 2) ** 2, rel=1e-5)
    codes = {f.code: f for f in res.findings}
    assert codes["SPEC-NONFINITE"].severity == "fail"
    assert {"SPEC-ZERO-WEIGHTS", "SPEC-FIT-FAILED", "SPEC-RANK-COLLAPSE", "SPEC-UNSUPPORTED-DTYPE",
            "SPEC-LOW-PRECISION"} <= set(codes)
    # the failed fit is not averaged into the summary
    ok = layers[layers["status"] == "success"]
    assert res.summary["alpha"] == pytest.approx(ok["alpha"].mean())
    assert res.summary["num_fits_failed"] == 1
    json.loads(res.to_json())


def test_torch_quantised_modules_are_analysed_from_their_packed_weights():
    # quantize_dynamic's Linear keeps its qint8 weight in packed params, not in the state dict:
    # those layers used to vanish from the analysis (and the hook check crashed on them)
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Conv1d(4, 8, 3), nn.Linear(96, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao quantisation is deprecated in torch 2.13 but still exists
        q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    res = analyze(q, keep_evals=True, precision="float64")
    layers = res.layers.set_index("name")
    assert list(layers.index) == ["0", "2", "3"]  # in module order, the float conv between them
    assert list(layers["dtype"]) == ["qint8", "float32", "qint8"]
    for name in ("0", "3"):
        w = q.get_submodule(name).weight().dequantize().double().numpy()
        np.testing.assert_allclose(res.evals[name], np.sort(np.linalg.svd(w, compute_uv=False) ** 2), rtol=1e-8)
    assert not any(n.endswith("_packed_params") for n in res.skipped["name"])


def test_parametrised_weights_are_analysed_as_the_model_uses_them():
    # weight_norm stores g and v, spectral_norm the unnormalised weight: the layer is the
    # effective weight, computed without the training-mode power-iteration step
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    model = nn.Sequential(P.weight_norm(nn.Linear(48, 64)), nn.ReLU(), P.spectral_norm(nn.Linear(64, 32)))
    with torch.no_grad():
        model[0].parametrizations.weight.original0.mul_(torch.rand(64, 1) + 0.5)  # g ≠ ‖v‖
    sn = model[2].parametrizations.weight[0]
    u0 = sn._u.clone()
    res = analyze(model, keep_evals=True, precision="float64")
    assert list(res.layers["name"]) == ["0", "2"] and sn.training and torch.equal(sn._u, u0)
    g, v = (t.detach().double() for t in (model[0].parametrizations.weight.original0,
                                          model[0].parametrizations.weight.original1))
    w0 = (g * v / v.norm(dim=1, keepdim=True)).numpy()  # weight_norm's definition, by hand
    np.testing.assert_allclose(res.evals["0"], np.sort(np.linalg.svd(w0, compute_uv=False) ** 2), rtol=1e-6)
    orig = model[2].parametrizations.weight.original.detach().double()
    sigma = float(sn._u.double() @ orig @ sn._v.double())  # spectral_norm's estimate in eval mode
    w2 = (orig / sigma).numpy()
    np.testing.assert_allclose(res.evals["2"], np.sort(np.linalg.svd(w2, compute_uv=False) ** 2), rtol=1e-6)
    reasons = dict(zip(res.skipped["name"], res.skipped["reason"], strict=True))
    assert reasons["0.parametrizations.weight.original1"].startswith("parametrisation piece (the effective")
    # a checkpoint of such a model: the pieces are named, not analysed as if they were weights
    ck = analyze(dict(model.state_dict()))
    assert ck.layers.empty
    assert "load the model" in dict(zip(ck.skipped["name"], ck.skipped["reason"], strict=True))[
        "2.parametrizations.weight.original"]


def test_the_deprecated_weight_norm_is_analysed_as_its_weight():
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, still in use
        model = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(48, 64)), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight_g.mul_(torch.rand(64, 1) + 0.5)
    res = analyze(model, keep_evals=True, precision="float64")
    assert list(res.layers["name"]) == ["0", "2"]
    g, v = model[0].weight_g.detach().double(), model[0].weight_v.detach().double()
    w0 = (g * v / v.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(res.evals["0"], np.sort(np.linalg.svd(w0, compute_uv=False) ** 2), rtol=1e-6)
    reasons = dict(zip(res.skipped["name"], res.skipped["reason"], strict=True))
    assert reasons["0.weight_v"].startswith("parametrisation piece") and "0.weight_g" in reasons


def test_summary_excludes_failed_fits_and_json_shape():
    torch.manual_seed(1)
    res = analyze({"a.weight": torch.randn(80, 40), "b.weight": torch.outer(torch.randn(80), torch.randn(40)),
                   "c.weight": torch.randn(60, 30)})
    doc = json.loads(res.to_json())
    assert {"layers", "summary", "skipped"} <= set(doc)
    assert [r["name"] for r in doc["layers"]] == ["a", "b", "c"]
    assert doc["layers"][1]["alpha"] is None  # NaN -> null, never -1
    alphas = [r["alpha"] for r in doc["layers"] if r["status"] == "success"]
    assert doc["summary"]["alpha"] == pytest.approx(sum(alphas) / len(alphas))


def test_conv_modes_and_ww_conventions_scale():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3)
    res_ww = analyze(conv, keep_evals=True, precision="float64")
    res_unf = analyze(conv, conv_mode="unfold", keep_evals=True, precision="float64")
    res_conv = analyze(conv, conventions="ww", keep_evals=True, precision="float64")
    w = conv.weight.detach()
    pooled = np.sort(np.concatenate([_svd2(w[:, :, i, j]) for i in range(3) for j in range(3)]))
    np.testing.assert_allclose(res_ww.evals["weight"], pooled, rtol=1e-8)
    np.testing.assert_allclose(res_unf.evals["weight"], _svd2(w.reshape(16, -1)), rtol=1e-8)
    np.testing.assert_allclose(res_conv.evals["weight"], 0.5 * pooled, rtol=1e-8)
    # scale-free metrics do not care about the 0.5
    assert res_conv.layers.loc[0, "alpha"] == pytest.approx(res_ww.layers.loc[0, "alpha"], rel=1e-9)
    with pytest.raises(InputError):
        analyze(conv, conv_mode="fft")
    with pytest.raises(InputError):
        analyze(conv, conventions="keras")


def test_dedup_gives_identical_results():
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)
    enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)  # clones: identical layers
    a = analyze(enc, dedup=True).layers
    b = analyze(enc, dedup=False).layers
    num = a.select_dtypes("number").columns
    np.testing.assert_array_equal(a[num].to_numpy(), b[num].to_numpy())


def test_streaming_sharded_safetensors_matches_module(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 96), nn.Linear(96, 40))
    sd = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    keys = list(sd)
    save_file({k: sd[k] for k in keys[:3]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[3:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 if i < 3 else 2}-of-00002.safetensors"
                                             for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    streamed = analyze(str(tmp_path), batch_bytes=1)  # flush after every matrix
    direct = analyze(m)
    cols = ["alpha", "D", "xmin", "lambda_max", "log_norm", "stable_rank"]
    np.testing.assert_allclose(streamed.layers[cols].to_numpy(float), direct.layers[cols].to_numpy(float),
                               rtol=1e-9)


def test_mp_fit_randomize_tpl_and_fingers_columns():
    torch.manual_seed(0)
    w = torch.randn(400, 100)
    w[0, 0] = 60.0  # one huge entry: a correlation trap survives shuffling
    u, _, v = torch.linalg.svd(torch.randn(400, 100), full_matrices=False)
    structured = (u * (30.0 / torch.arange(1, 101).float())) @ v  # strong correlations
    res = analyze({"trap.weight": w, "plain.weight": torch.randn(400, 100),
                   "struct.weight": structured}, mp_fit=True, randomize=True, fit="TPL",
                  fix_fingers="clip_xmax", seed=3)
    df = res.layers.set_index("name")
    for col in ("sigma_mp", "bulk_max", "num_spikes", "mp_softrank", "rand_distance", "num_traps",
                "tpl_alpha", "tpl_lambda"):
        assert col in df.columns
    assert df.loc["trap", "num_traps"] >= 1
    assert df.loc["plain", "num_traps"] == 0
    # shuffling a random matrix changes little; shuffling a correlated one changes a lot
    assert df.loc["plain", "rand_distance"] < 0.15 < 0.5 < df.loc["struct", "rand_distance"] <= 1.0
    assert "SPEC-CORRELATION-TRAP" in {f.code for f in res.findings}
    assert res.summary["mp_softrank"] is not None
    assert abs(df.loc["plain", "sigma_mp"] - 1) < 0.1


def test_one_or_two_threads_give_the_same_table():
    # eigen-solves are shared out among threads (one matrix per thread), each layer's fit runs
    # as soon as its eigenvalues are in (beside the other solves; for stacks of small matrices
    # in this thread while a worker solves the next stack), and small batches flush several
    # times: none of this may change a number
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(128, 128, 3), nn.Conv2d(128, 256, 3), nn.Flatten(),
                      nn.Linear(400, 300), nn.Linear(300, 120), nn.Linear(120, 10),
                      nn.Linear(10, 40), nn.Linear(40, 40), nn.Linear(40, 24), nn.Conv2d(24, 16, 3))
    one = analyze(m, threads=1, keep_evals=True)
    cols = ["alpha", "D", "xmin", "lambda_max", "log_norm", "stable_rank", "entropy"]
    for kw in ({"threads": 2}, {"threads": 2, "batch_bytes": 1 << 16}):
        two = analyze(m, keep_evals=True, **kw)
        assert len(two.layers) == 9 and two.timing["fits_overlapped"] == 9
        np.testing.assert_array_equal(one.layers[cols].to_numpy(), two.layers[cols].to_numpy())
        for name, ev in one.evals.items():
            np.testing.assert_array_equal(ev, two.evals[name])
    # the table equals fits of the eigenvalues made afterwards, one layer at a time
    for _, row in one.layers.iterrows():
        fit = fit_powerlaw(one.evals[row["name"]])
        assert (row["alpha"], row["D"], row["xmin"]) == (fit.alpha, fit.D, fit.xmin)
    np.testing.assert_allclose(one.evals["3"], _svd2(m[3].weight), rtol=1e-4, atol=1e-6 * one.evals["3"][-1])


def test_chunked_stacks_give_the_same_table(monkeypatch):
    # same-shaped layers are solved in chunks of whole layers (their fits overlap the next
    # chunk's solve; with two threads the chunks go to a worker while later layers are being
    # prepared): the chunking may not change a number
    import sys

    from nndiag.spectral import esd as esd_mod

    mod = sys.modules[analyze.__module__]
    torch.manual_seed(5)
    m = nn.Sequential(*[nn.Conv2d(16, 16, 3, padding=1) for _ in range(6)], nn.Conv2d(16, 32, 3))
    whole = analyze(m, threads=2, precision="float64", keep_evals=True, device="cpu")  # (chunks: CPU only)
    sizes = []
    real = esd_mod._eig_gram_torch

    def spy(mats, *args):
        sizes.append(mats.shape[0])
        return real(mats, *args)

    monkeypatch.setattr(mod, "_CHUNK_WORK", 2 * 9 * 16**3)  # two layers a chunk
    monkeypatch.setattr(esd_mod, "_eig_gram_torch", spy)
    for threads in (2, 1):  # streamed as the layers come / chunked when flushed
        sizes.clear()
        parts = analyze(m, threads=threads, precision="float64", keep_evals=True, device="cpu")
        # six 16×16 layers in three chunks, the 16→32 layer alone; with a worker the larger
        # matrices are read first (``_walk_order``), and the table stays in model order
        assert sizes == ([9, 18, 18, 18] if threads == 2 else [18, 18, 18, 9])
        assert list(parts.layers["name"]) == [str(i) for i in range(7)]
        cols = ["alpha", "D", "xmin", "lambda_max", "log_norm", "stable_rank", "entropy"]
        np.testing.assert_array_equal(whole.layers[cols].to_numpy(), parts.layers[cols].to_numpy())
        for name, ev in whole.evals.items():
            np.testing.assert_array_equal(ev, parts.evals[name])
    layers = dict(m.named_modules())
    for name, ev in whole.evals.items():
        w = layers[name].weight
        slices = w.permute(2, 3, 0, 1).reshape(9, w.shape[0], w.shape[1])  # one matrix per kernel position
        ref = np.sort(np.concatenate([_svd2(s) for s in slices]))
        np.testing.assert_allclose(ev, ref, rtol=1e-9, atol=1e-12)


def test_stacks_are_solved_while_later_layers_are_prepared(monkeypatch):
    # with two threads a shape group goes to the worker when a layer of another shape follows
    # it (and it holds enough work), not at the end: the first group's stack is submitted while
    # the second group is being added; the stacks' fits wait until every layer is handed over
    # (fitting between layers kept the worker waiting for its next stack); the larger matrices
    # are read first (``_walk_order``: 48×48, then 32×32, then 48→8), the table stays in model
    # order; numbers unchanged
    import sys

    from nndiag.spectral import esd as esd_mod

    mod = sys.modules[analyze.__module__]
    torch.manual_seed(6)
    m = nn.Sequential(*[nn.Conv2d(32, 32, 3) for _ in range(4)], *[nn.Conv2d(48, 48, 3) for _ in range(4)],
                      nn.Conv2d(48, 8, 1))
    events = []
    real_add, real_submit = mod._Batcher.add, esd_mod.TorchStream.submit

    def add(self, key, mats):
        events.append(("add", key))
        real_add(self, key, mats)

    def submit(self, mats, tag):
        events.append(("submit", tuple(k for k, _ in tag)))
        real_submit(self, mats, tag)

    real_fit_all = mod._fit_all

    def fit_all(todo, *args):
        events.append(("fit", tuple(k for k, _ in todo)))
        return real_fit_all(todo, *args)

    monkeypatch.setattr(mod._Batcher, "add", add)
    monkeypatch.setattr(esd_mod.TorchStream, "submit", submit)
    monkeypatch.setattr(mod, "_fit_all", fit_all)
    two = analyze(m, threads=2, keep_evals=True, device="cpu")
    assert [e[1] for e in events if e[0] == "add"] == ["4", "5", "6", "7", "0", "1", "2", "3", "8"]
    assert events.index(("submit", ("4", "5", "6", "7"))) == events.index(("add", "0")) + 1
    fits = [e for e in events if e[0] == "fit"]
    assert fits == [("fit", ("4", "5", "6", "7")), ("fit", ("0", "1", "2", "3")), ("fit", ("8",))]
    assert events.index(fits[0]) > events.index(("add", "8"))
    events[:] = [e for e in events if e[0] != "fit"]
    # the lone 48→8 layer (little work) waits for the flush
    assert events[-3:] == [("add", "8"), ("submit", ("0", "1", "2", "3")), ("submit", ("8",))]
    assert list(two.layers["name"]) == [str(i) for i in range(9)]
    one = analyze(m, threads=1, keep_evals=True, device="cpu")
    cols = ["alpha", "D", "xmin", "lambda_max", "log_norm", "stable_rank", "entropy"]
    np.testing.assert_array_equal(one.layers[cols].to_numpy(), two.layers[cols].to_numpy())
    for name, ev in one.evals.items():
        np.testing.assert_array_equal(ev, two.evals[name])
        w = dict(m.named_modules())[name].weight
        k = w.shape[2] * w.shape[3]
        ref = np.sort(np.concatenate([_svd2(s) for s in w.permute(2, 3, 0, 1).reshape(k, *w.shape[:2])]))
        np.testing.assert_allclose(ev, ref, rtol=1e-4, atol=1e-6 * ref[-1])


def test_a_stacks_fits_are_made_together_with_the_single_fits_numbers(monkeypatch):
    # the layers of a stack are fitted by one fit_powerlaw_many call and measured by one
    # layer_metrics_many call (one thread, or two beside the solver worker): the table equals
    # fits and metrics of each layer's eigenvalues made one at a time, rank-deficient layers
    # included
    import sys

    mod = sys.modules[analyze.__module__]
    torch.manual_seed(8)
    m = nn.Sequential(*[nn.Conv2d(24, 24, 3) for _ in range(6)])
    with torch.no_grad():
        for i in (1, 4):  # zero input channels: eigenvalues at zero, below the fit's threshold
            m[i].weight[:, 10 + i :] = 0.0
    sizes = []
    real = mod.fit_powerlaw_many

    def spy(evs, **kw):
        sizes.append(len(evs))
        return real(evs, **kw)

    monkeypatch.setattr(mod, "fit_powerlaw_many", spy)
    for threads in (1, 2):
        sizes.clear()
        res = analyze(m, threads=threads, keep_evals=True, device="cpu")
        assert sizes == [6]
        for _, row in res.layers.iterrows():
            ev = res.evals[row["name"]]
            fit = fit_powerlaw(ev)
            assert (row["alpha"], row["D"], row["xmin"], row["num_pl_spikes"]) == (
                fit.alpha, fit.D, fit.xmin, fit.num_pl_spikes)
            one = layer_metrics(ev, fit, row["N"], row["M"], row["rf"])
            for key in ("matrix_rank", "rank_loss", "weak_rank_loss", "detX_num", "warning", "status"):
                assert row[key] == one[key], key
            for key in ("lambda_max", "norm", "log_norm", "stable_rank", "entropy", "log_alpha_norm",
                        "alpha_weighted", "detX_val", "sv_min"):
                assert row[key] == pytest.approx(one[key], rel=1e-13), key
    assert (res.evals["1"] <= 1e-5).sum() > 0


def _grouped_fused(parts: dict[str, torch.Tensor], groups: int, order: str) -> torch.Tensor:
    """A fused Q/K/V weight assembled row by row as the models document it: ``groups`` blocks,
    each with the next ``rows / groups`` rows of every part in ``order``."""
    rows = []
    for g in range(groups):
        for letter in order:
            step = parts[letter].shape[0] // groups
            rows.append(parts[letter][g * step:(g + 1) * step])
    return torch.cat(rows)


def test_fused_qkv_grouped_per_head_or_partition_split_with_the_model_config(tmp_path):
    from nndiag.spectral.matrices import grouped_qkv

    gen = torch.Generator().manual_seed(5)
    full = {k: torch.randn(32, 32, generator=gen) * s for k, s in zip("qkv", (1.0, 2.0, 0.5), strict=True)}
    # Falcon with grouped K/V heads (4 query heads of size 8 sharing 2 K/V heads): K and V have 16 rows;
    # multi-query Falcon: one K/V head of 8 rows, after all the query rows
    gqa = {"q": full["q"], "k": full["k"][:16], "v": full["v"][:16]}
    mq = {"q": full["q"], "k": full["k"][:8], "v": full["v"][:8]}
    qkv = "query_key_value"
    cases = [({"model_type": "gpt_neox", "hidden_size": 32, "num_attention_heads": 4}, f"l.0.attention.{qkv}",
              full, 4, "qkv"),
             ({"model_type": "bloom", "hidden_size": 32, "n_head": 8}, f"h.0.self_attention.{qkv}", full, 8, "qkv"),
             ({"model_type": "persimmon", "hidden_size": 32, "num_attention_heads": 2}, f"l.0.self_attn.{qkv}",
              full, 2, "qkv"),
             ({"model_type": "codegen", "n_embd": 32}, "h.0.attn.qkv_proj", full, 4, "qvk"),
             ({"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "multi_query": False},
              f"h.0.self_attention.{qkv}", full, 4, "qkv"),
             ({"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "num_kv_heads": 2,
               "new_decoder_architecture": True}, f"h.0.self_attention.{qkv}", gqa, 2, "qkv"),
             ({"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "multi_query": True},
              f"h.0.self_attention.{qkv}", mq, 1, "qkv"),
             # Phi-3 with grouped K/V heads: [Q; K; V] blocks of 32, 16, 16 rows (the name rule
             # alone would leave it whole); GPT-BigCode's c_attn: multi-query or per head
             ({"model_type": "phi3", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2},
              "l.0.self_attn.qkv_proj", gqa, 1, "qkv"),
             ({"model_type": "gpt_bigcode", "hidden_size": 32, "num_attention_heads": 4, "multi_query": True},
              "h.0.attn.c_attn", mq, 1, "qkv"),
             ({"model_type": "gpt_bigcode", "hidden_size": 32, "num_attention_heads": 4, "multi_query": False},
              "h.0.attn.c_attn", full, 4, "qkv"),
             # MPT's Wqkv split [d_model, kv·d, kv·d] (grouped or multi-query K/V heads); Falcon's first
             # model types: RefinedWeb (40B) grouped as the new decoder architecture, RefinedWebModel
             # (7B) multi-query
             ({"model_type": "mpt", "d_model": 32, "n_heads": 4,
               "attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}},
              "transformer.blocks.0.attn.Wqkv", gqa, 1, "qkv"),
             ({"model_type": "mpt", "d_model": 32, "n_heads": 4, "attn_config": {"attn_type": "multiquery_attention"}},
              "transformer.blocks.0.attn.Wqkv", mq, 1, "qkv"),
             ({"model_type": "RefinedWeb", "hidden_size": 32, "n_head": 4, "n_head_kv": 2},
              f"transformer.h.0.self_attention.{qkv}", gqa, 2, "qkv"),
             ({"model_type": "RefinedWebModel", "hidden_size": 32, "n_head": 4, "multi_query": True},
              f"transformer.h.0.self_attention.{qkv}", mq, 1, "qkv")]
    for cfg, name, parts, groups, order in cases:
        w = _grouped_fused(parts, groups, order)
        r = analyze({f"{name}.weight": w}, hf_config=cfg, keep_evals=True, precision="float64")
        assert list(r.layers["name"]) == [f"{name}.q", f"{name}.k", f"{name}.v"], cfg
        for letter in "qkv":
            np.testing.assert_allclose(r.evals[f"{name}.{letter}"], _svd2(parts[letter]), rtol=1e-8)
        assert r.params["qkv_layout"]["groups"] == groups
        assert [b[0] for b in r.params["qkv_layout"]["blocks"]] == list(order)
    # a config whose sizes do not match the weight: analysed whole
    r = analyze({f"l.0.attention.{qkv}.weight": _grouped_fused(full, 4, "qkv")},
                hf_config={"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4})
    assert list(r.layers["name"]) == [f"l.0.attention.{qkv}"]
    # without the config the weights do not say: query_key_value whole, qkv_proj as row blocks
    w = _grouped_fused(full, 4, "qkv")
    r = analyze({"l.0.attention.query_key_value.weight": w})
    assert list(r.layers["name"]) == ["l.0.attention.query_key_value"] and r.params["qkv_layout"] is None
    assert grouped_qkv({"model_type": "gpt_neox"}) is None  # no head count: no layout
    # MPT with as many K/V heads as query heads: equal [Q; K; V] blocks, split by the name rule
    mpt = {"model_type": "mpt", "d_model": 32, "n_heads": 4, "attn_config": {"attn_type": "multihead_attention"}}
    assert grouped_qkv(mpt) is None
    r = analyze({"b.0.attn.Wqkv.weight": _grouped_fused(full, 1, "qkv")}, hf_config=mpt, keep_evals=True,
                precision="float64")
    for letter in "qkv":
        np.testing.assert_allclose(r.evals[f"b.0.attn.Wqkv.{letter}"], _svd2(full[letter]), rtol=1e-8)
    # a Hugging Face module and its saved folder carry the config themselves
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoXConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                     num_hidden_layers=1, vocab_size=50)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(cfg)
    fused = model.gpt_neox.layers[0].attention.query_key_value.weight.detach()
    d = 32 // 4
    q = torch.cat([fused[h * 3 * d:h * 3 * d + d] for h in range(4)])  # the query rows of each head
    model.save_pretrained(tmp_path / "neox")
    key = "gpt_neox.layers.0.attention.query_key_value.q"
    for source in (model, tmp_path / "neox", tmp_path / "neox" / "model.safetensors"):
        r = analyze(source, keep_evals=True, precision="float64")
        np.testing.assert_allclose(r.evals[key], _svd2(q), rtol=1e-8)
    # Falcon's own head split as the reference: its queries for the identity input are Wqᵀ
    for extra in ({"new_decoder_architecture": True, "num_kv_heads": 2}, {"multi_query": True},
                  {"multi_query": False}):
        fcfg = transformers.FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                         vocab_size=50, **extra)
        falcon = transformers.FalconForCausalLM(fcfg)
        attn = falcon.transformer.h[0].self_attention
        with torch.no_grad():
            query = attn._split_heads(attn.query_key_value(torch.eye(32)[None]))[0]
        wq = query[0].reshape(32, -1).T  # (query features, inputs)
        r = analyze(falcon, keep_evals=True, precision="float64")
        np.testing.assert_allclose(r.evals["transformer.h.0.self_attention.query_key_value.q"], _svd2(wq),
                                   rtol=1e-8, err_msg=str(extra))
    # StarCoder-style multi-query c_attn (an nn.Linear): its first hidden_size rows are the queries
    bigcode = transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(
        n_embd=32, n_head=4, n_layer=1, vocab_size=50, n_positions=16, multi_query=True))
    c_attn = bigcode.transformer.h[0].attn.c_attn.weight.detach()
    r = analyze(bigcode, keep_evals=True, precision="float64")
    for letter, rows in (("q", c_attn[:32]), ("k", c_attn[32:40]), ("v", c_attn[40:])):
        np.testing.assert_allclose(r.evals[f"transformer.h.0.attn.c_attn.{letter}"], _svd2(rows), rtol=1e-8)


def test_walk_order_keeps_tables_in_model_order():
    # with a worker (two threads, in memory) layers are read largest first; every table still
    # lists them in model order, value-check skips included, and the numbers equal one thread's
    import sys

    import pandas as pd

    from nndiag.io.tensors import ModuleSource
    from nndiag.spectral.matrices import plan_layers

    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(20, 16), nn.Linear(16, 48), nn.Linear(48, 48), nn.Linear(48, 24),
                      nn.Linear(24, 64), nn.Linear(64, 10))
    with torch.no_grad():
        m[1].weight[0, 0] = float("nan")
        m[4].weight[1, 1] = float("inf")
    two = analyze(m, threads=2, device="cpu", precision="float64")
    one = analyze(m, threads=1, device="cpu", precision="float64")
    assert list(two.layers["name"]) == ["0", "2", "3", "5"] == list(one.layers["name"])
    bad = two.skipped[two.skipped["reason"].str.startswith("non-finite")]
    assert list(bad["name"]) == ["1.weight", "4.weight"]
    pd.testing.assert_frame_equal(two.skipped, one.skipped)
    cols = ["alpha", "D", "xmin", "lambda_max", "log_norm", "stable_rank"]
    np.testing.assert_array_equal(two.layers[cols].to_numpy(), one.layers[cols].to_numpy())
    order = sys.modules[analyze.__module__]._walk_order
    specs, _ = plan_layers(ModuleSource(m).infos())
    assert [s.name for s in order(specs, True)] == ["2", "4", "3", "1", "0", "5"]
    assert order(specs, False) == specs
