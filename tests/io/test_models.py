"""Model loading: round-trips through every supported format, and bad input."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from nndiag.errors import ModelLoadError
from nndiag.io.models import load_model
from nndiag.models import build_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("digits-cnn", batchnorm=True)


def _assert_same(tensors, reference: dict[str, torch.Tensor]) -> None:
    got = tensors.to_dict()
    assert set(got) == set(reference)
    for k, v in reference.items():
        assert torch.equal(got[k], v), k


def test_module_source_lists_params_and_buffers_with_owner_types():
    m = _model()
    lm = load_model(m)
    assert lm.module is m and lm.origin == "module"
    infos = {i.name: i for i in lm.tensors.infos()}
    assert infos["features.0.weight"].module_type == "Conv2d"
    assert infos["features.1.running_mean"].module_type == "BatchNorm2d"
    _assert_same(lm.tensors, m.state_dict())


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".th", ".bin", ".ckpt"])
def test_checkpoint_roundtrip(tmp_path, suffix):
    m = _model()
    p = tmp_path / f"m{suffix}"
    torch.save(m.state_dict(), p)
    lm = load_model(p)
    assert lm.origin == "checkpoint" and lm.module is None
    _assert_same(lm.tensors, m.state_dict())


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state"])
def test_nested_and_dataparallel_prefix(tmp_path, key):
    m = _model()
    wrapped = {key: {f"module.{k}": v for k, v in m.state_dict().items()}, "epoch": 3}
    p = tmp_path / "ckpt.pt"
    torch.save(wrapped, p)
    _assert_same(load_model(p).tensors, m.state_dict())


def test_checkpoint_with_arch_gives_runnable_module_equal_outputs(tmp_path):
    m = _model().eval()
    p = tmp_path / "m.pt"
    torch.save(m.state_dict(), p)
    torch.manual_seed(1)
    plain = build_model("digits-cnn").eval()
    torch.save(plain.state_dict(), p)
    lm = load_model(p, arch="digits-cnn")
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(lm.module.eval()(x), plain(x))


def test_safetensors_single_and_sharded(tmp_path):
    m = _model()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    _assert_same(load_model(tmp_path / "model.safetensors").tensors, sd)

    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    keys = sorted(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, ks in enumerate(halves):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in ks}, str(shard_dir / name))
        weight_map.update({k: name for k in ks})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    lm = load_model(shard_dir / "model.safetensors.index.json")
    _assert_same(lm.tensors, sd)
    # the folder form finds the index too, and metadata needs no tensor reads
    lm2 = load_model(shard_dir)
    assert {i.name: i.shape for i in lm2.tensors.infos()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_hugging_face_folder_without_hub(tmp_path):
    m = _model()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "custom", "hidden_size": 64}))
    save_file(sd, str(tmp_path / "model.safetensors"))
    lm = load_model(tmp_path)
    assert lm.origin == "hf" and lm.meta["config"]["hidden_size"] == 64
    _assert_same(lm.tensors, sd)
    # pytorch_model.bin variant
    d2 = tmp_path / "bin"
    d2.mkdir()
    (d2 / "config.json").write_text("{}")
    torch.save(sd, d2 / "pytorch_model.bin")
    _assert_same(load_model(d2).tensors, sd)
    # a weights file named inside the folder carries the folder's config too; a sibling
    # config.json that is not a model config (no model_type, not JSON) is left out
    assert load_model(tmp_path / "model.safetensors").meta["config"]["model_type"] == "custom"
    assert "config" not in load_model(d2 / "pytorch_model.bin").meta
    (d2 / "config.json").write_text("{not json")
    lm3 = load_model(d2 / "pytorch_model.bin")
    assert "config" not in lm3.meta
    _assert_same(lm3.tensors, sd)


def test_onnx_initializers(tmp_path):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    p = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(p))
    lm = load_model(p)
    assert lm.origin == "onnx"
    assert torch.equal(lm.tensors.get("W"), torch.from_numpy(w))
    assert {i.name: i.module_type for i in lm.tensors.infos()}["W"] == "Linear"


def test_factory_and_builtin_with_weights(tmp_path):
    m = build_model("digits-mlp")
    p = tmp_path / "w.pt"
    torch.save(m.state_dict(), p)
    lm = load_model("nndiag.models.small:digits_mlp", weights=p)
    assert lm.origin == "factory"
    _assert_same(lm.tensors, m.state_dict())
    lm2 = load_model("digits-mlp", weights=p)
    assert lm2.origin == "builtin"
    _assert_same(lm2.tensors, m.state_dict())


# ---- bad input ------------------------------------------------------------------------------

def _raises(match: str, *args, **kwargs):
    with pytest.raises(ModelLoadError, match=match):
        load_model(*args, **kwargs)


def test_bad_inputs(tmp_path):
    (tmp_path / "a.xyz").write_text("hello")
    _raises("unknown model file type", tmp_path / "a.xyz")
    (tmp_path / "empty.pt").write_bytes(b"")
    _raises("file is empty", tmp_path / "empty.pt")
    torch.save(_model().state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    _raises("truncated or corrupt", tmp_path / "trunc.pt")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 5)
    _raises("not a valid safetensors", tmp_path / "garbage.safetensors")
    save_file({"w": torch.ones(100, 100)}, str(tmp_path / "ok.safetensors"))
    st = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(st[:-100])
    _raises("truncated", tmp_path / "cut.safetensors")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx at all")
    _raises("not a valid ONNX", tmp_path / "bad.onnx")
    (tmp_path / "nothing").mkdir()
    _raises("no weights", tmp_path / "nothing")
    _raises("no such file", tmp_path / "missing.pt")
    _raises("not a file, factory or built-in", "resnet999")
    _raises("cannot import module", "no_such_pkg.mod:factory")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "nostate.pt")
    _raises("no state dict", tmp_path / "nostate.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("this should never run",))


def test_unsafe_pickle_is_refused(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as fh:
        pickle.dump({"state_dict": _Evil()}, fh)
    _raises("runs arbitrary code", p)
    # a whole pickled module also needs arbitrary code
    torch.save(_model(), tmp_path / "module.pt")
    _raises("runs arbitrary code", tmp_path / "module.pt")
    assert "should never run" not in capsys.readouterr().out


def test_weights_that_do_not_fit(tmp_path):
    torch.save(build_model("digits-mlp").state_dict(), tmp_path / "mlp.pt")
    _raises("do not fit", tmp_path / "mlp.pt", arch="digits-cnn")
    torch.save(build_model("digits-cnn", width=8).state_dict(), tmp_path / "narrow.pt")
    _raises("do not fit", tmp_path / "narrow.pt", arch="digits-cnn")


def test_lightning_checkpoint_loads_into_the_bare_architecture(tmp_path):
    """A PyTorch Lightning checkpoint: weights under ``state_dict`` with the LightningModule's
    attribute (``model.``) in front; beside other tensors, and beside an EMA copy (then the
    user says which: ``FILE#PREFIX``)."""
    torch.manual_seed(3)
    plain = build_model("digits-cnn").eval()
    sd = plain.state_dict()
    x = torch.randn(4, 1, 8, 8)
    p = tmp_path / "epoch=3.ckpt"
    extra = {"loss_fn.weight": torch.ones(10)}
    torch.save({"epoch": 3, "state_dict": {**{f"model.{k}": v for k, v in sd.items()}, **extra}}, p)
    lm = load_model(p, arch="digits-cnn")
    assert torch.equal(lm.module.eval()(x), plain(x))
    assert lm.meta["ignored_keys"] == ["loss_fn.weight"]
    lw = load_model("digits-cnn", weights=p)
    assert torch.equal(lw.module.eval()(x), plain(x)) and lw.meta["ignored_keys"] == ["loss_fn.weight"]
    exact = tmp_path / "exact.pt"
    torch.save(sd, exact)
    assert load_model(exact, arch="digits-cnn").meta == {}
    # a prefix that covers only some of the architecture's keys is no match
    torch.save({f"model.{k}" if "features" in k else k: v for k, v in sd.items()}, tmp_path / "mixed.pt")
    _raises("do not fit", tmp_path / "mixed.pt", arch="digits-cnn")
    # the architecture twice (a model and its EMA copy): no guessing, and FILE#PREFIX chooses
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    both = tmp_path / "ema.ckpt"
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in sd.items()},
                               **{f"model_ema.{k}": v for k, v in ema.items()}}}, both)
    _raises(f"several prefixes .*{both}#model", both, arch="digits-cnn")
    chosen = load_model(f"{both}#model_ema.", arch="digits-cnn")
    ref = build_model("digits-cnn").eval()
    ref.load_state_dict(ema)
    assert torch.equal(chosen.module.eval()(x), ref(x)) and chosen.name == "ema#model_ema"
    assert torch.equal(load_model("digits-cnn", weights=f"{both}#model.").module.eval()(x), plain(x))
    assert [i.name for i in load_model(f"{both}#model_ema.").tensors.infos()] == list(sd)
    _raises("no tensor names start with", f"{both}#teacher.", arch="digits-cnn")


def test_hugging_face_runnable_module_offline(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    ref = transformers.GPT2Model(cfg).eval()
    ref.save_pretrained(str(tmp_path))
    lm = load_model(tmp_path, hf_module=True)
    assert lm.origin == "hf" and lm.module is not None
    assert lm.module.display_class == "GPT2Model" and type(lm.module.model) is type(ref)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():  # run as analyses run it: a tensor (no head: the hidden states)
        assert torch.allclose(lm.module(x), ref(x).last_hidden_state)
    kinds = {i.name: i.module_type for i in lm.tensors.infos()}
    assert kinds["h.0.attn.c_attn.weight"] == "Conv1D"  # GPT-2's transposed linear, named as saved
