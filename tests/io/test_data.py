"""DATA specs and Python data inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag.errors import DataError, InputError
from nndiag.io.data import as_data, index_layer, load_data, model_inputs


def test_digits_matches_sklearn_and_splits_are_disjoint():
    from sklearn.datasets import load_digits

    d = load_data("digits")
    ref = load_digits()
    assert len(d) == 1797 and d.input_shape == (1, 8, 8) and d.num_classes == 10
    np.testing.assert_allclose(d.x.numpy()[:, 0], ref.images / 16.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(d.y.numpy(), ref.target)
    tr, te = load_data("digits?split=train"), load_data("digits?split=test")
    assert len(tr) + len(te) == 1797 and abs(len(te) - 449) <= 1
    # disjoint: no test image appears in train
    tr_set = {tuple(r) for r in tr.x.reshape(len(tr), -1).numpy().round(4)}
    dup = sum(tuple(r) in tr_set for r in te.x.reshape(len(te), -1).numpy().round(4))
    assert dup < 5  # sklearn digits has a handful of exact duplicate images


def test_subset_is_seeded_and_flatten_option():
    a = load_data("digits", n_samples=100, seed=3)
    b = load_data("digits", n_samples=100, seed=3)
    c = load_data("digits", n_samples=100, seed=4)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert load_data("digits?flatten=1", n_samples=5).input_shape == (64,)


def test_mnist1d_generated_offline():
    pytest.importorskip("mnist1d")
    tr = load_data("mnist1d?split=train")
    te = load_data("mnist1d?split=test")
    assert tr.input_shape == (40,) and len(tr) == 4000 and len(te) == 1000
    assert sorted(torch.unique(tr.y).tolist()) == list(range(10))


def test_npz_uint8_images_become_channel_first(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(20, 6, 6, 3), dtype=np.uint8)
    y = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = load_data(tmp_path / "d.npz")
    assert d.input_shape == (3, 6, 6) and d.num_classes == 4
    np.testing.assert_allclose(d.x[2, 1].numpy(), x[2, :, :, 1] / 255.0, atol=1e-7)
    n = load_data(f"{tmp_path / 'd.npz'}?normalize=imagenet")
    np.testing.assert_allclose(n.x[0, 0].numpy(), (x[0, :, :, 0] / 255.0 - 0.485) / 0.229, atol=1e-5)


def test_image_folder(tmp_path):
    for c, color in (("cat", 10), ("dog", 200)):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((5, 5), color + i, dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    d = load_data(tmp_path)
    assert len(d) == 6 and d.input_shape == (1, 5, 5) and d.meta["classes"] == ["cat", "dog"]
    assert d.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert float(d.x[3, 0, 0, 0]) == pytest.approx(200 / 255)


def test_python_inputs():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    d = as_data((x, y))
    assert torch.equal(d.x, x) and d.num_classes == 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    d2 = as_data(loader)
    assert torch.equal(d2.x, x) and torch.equal(d2.y, y)
    assert len(as_data(loader, n_samples=6)) == 6


def test_bad_data(tmp_path):
    np.savez(tmp_path / "noxy.npz", a=np.zeros(3))
    with pytest.raises(DataError, match="must contain arrays 'x' and 'y'"):
        load_data(tmp_path / "noxy.npz")
    np.savez(tmp_path / "mismatch.npz", x=np.zeros((5, 2)), y=np.zeros(4))
    with pytest.raises(DataError, match="5 examples but y has 4"):
        load_data(tmp_path / "mismatch.npz")
    with pytest.raises(DataError, match="names no data set"):
        load_data("imagenet-full")
    with pytest.raises(DataError, match="unknown data option"):
        load_data("digits?colour=blue")
    with pytest.raises(DataError, match="unknown split"):
        load_data("digits?split=valid")
    with pytest.raises(DataError, match="only 1797"):
        load_data("digits", n_samples=5000)
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read .npz"):
        load_data(tmp_path / "bad.npz")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_data(tmp_path / "empty_dir")
    with pytest.raises(DataError, match="NaN"):
        as_data((torch.tensor([[float("nan")]]), torch.tensor([0])))


def _token_model(vocab: int = 10) -> nn.Module:
    return nn.Sequential(nn.Embedding(vocab, 4), nn.Flatten(), nn.Linear(12, 2))


def test_integer_inputs_are_kept_as_int64_and_cast_per_model():
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]], dtype=torch.int32)
    d = as_data((ids, torch.tensor([0, 1])))
    assert d.x.dtype == torch.int64 and torch.equal(d.x, ids.long())
    tok, mlp = _token_model(), nn.Sequential(nn.Linear(3, 2))
    for dtype in (torch.float32, torch.float64):  # token ids stay ids even for float64 analyses
        t = model_inputs(tok, d.x, dtype=dtype)
        assert t.dtype == torch.int64 and torch.equal(t, d.x)
        f = model_inputs(mlp, d.x, dtype=dtype)  # integer features of an MLP become floats
        assert f.dtype == dtype and torch.equal(f, ids.to(dtype))
    assert model_inputs(tok, d.x) is d.x  # nothing to change: no copy
    assert model_inputs(tok, torch.rand(2, 3)).dtype == torch.float32  # floats never become ids
    assert index_layer(tok, d.x) == ("0", tok[0])
    assert index_layer(mlp, d.x) is None and index_layer(tok, d.x.float()) is None
    assert index_layer(nn.EmbeddingBag(10, 3), d.x)[1].num_embeddings == 10
    assert as_data((torch.tensor([[True], [False]]), torch.tensor([0, 1]))).x.dtype == torch.float32
    uint8 = as_data((np.array([[0, 255]], dtype=np.uint8), np.array([1])))  # raw arrays: values kept
    assert torch.equal(model_inputs(mlp, uint8.x), torch.tensor([[0.0, 255.0]]))
    with pytest.raises(InputError, match="floating dtype"):
        model_inputs(mlp, d.x, dtype=torch.int64)


class _LinearFirst(nn.Module):
    """Registers an embedding first but applies a linear layer to its input first."""

    def __init__(self) -> None:
        super().__init__()
        self.position = nn.Embedding(3, 2)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + self.position(torch.arange(2, device=x.device)).sum()


class _EmbeddingCalledFirst(nn.Module):
    """Registers the head first; the embedding reads the input."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(12, 2)
        self.blocks = nn.Sequential(nn.Embedding(10, 4), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).flatten(1))


def test_the_first_layer_applied_decides_not_registration_order():
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    lin = _LinearFirst()
    assert index_layer(lin, ids) is None
    assert model_inputs(lin, ids).dtype == torch.float32
    emb = _EmbeddingCalledFirst()
    before = snapshot(emb)
    assert index_layer(emb, ids) == ("blocks.0", emb.blocks[0])
    assert model_inputs(emb, ids, dtype=torch.float64).dtype == torch.int64
    assert same_snapshot(before, snapshot(emb))  # probe hooks removed, nothing changed
    assert not any(m._forward_pre_hooks for m in emb.modules())
    assert emb(model_inputs(emb, ids)).shape == (2, 2)


def test_token_ids_out_of_range_and_integer_npz(tmp_path):
    ids = torch.tensor([[1, 2, 3], [4, 5, 10]])
    with pytest.raises(DataError, match=r"tokens: token ids must lie in \[0, 9\] for layer '0' "
                                        r"\(Embedding with 10 entries\); found 1\.\.10"):
        model_inputs(_token_model(), ids, name="tokens")
    with pytest.raises(DataError, match=r"found -1\.\.3"):
        model_inputs(_token_model(), ids.clamp(max=5) - 2)
    np.savez(tmp_path / "tokens.npz", x=np.array([[1, 2, 3], [7, 8, 9]], dtype=np.int16), y=np.array([0, 1]))
    d = load_data(tmp_path / "tokens.npz")
    assert d.x.dtype == torch.int64 and int(d.x[1, 2]) == 9
    std = load_data(f"{tmp_path / 'tokens.npz'}?normalize=standard")  # normalised: numeric features
    assert std.x.dtype == torch.float32
    np.testing.assert_allclose(std.x[:, 0].numpy(), [-0.70710678, 0.70710678], rtol=1e-6)


def test_bundle_name_records_the_options_given(tmp_path):
    import numpy as np

    from nndiag.io.data import load_data

    assert load_data("digits").name == "digits"
    assert load_data("digits?normalize=standard&split=test").name == "digits?split=test&normalize=standard"
    f = tmp_path / "imgs.npz"
    np.savez(f, x=np.zeros((4, 3, 2, 2), dtype=np.uint8), y=np.arange(4) % 2)
    d = load_data(f"{f}?normalize=imagenet")
    assert d.name == f"{f}?normalize=imagenet" and d.meta["normalize"] == "imagenet"


def test_a_token_stream_is_cut_into_blocks(tmp_path):
    stream = np.arange(1000, dtype=np.int32) % 97
    np.savez(tmp_path / "corpus.npz", x=stream)
    b = load_data(tmp_path / "corpus.npz")  # default block: 128 tokens
    assert b.meta["tokens"] and tuple(b.x.shape) == (7, 128) and torch.equal(b.x, b.y)
    assert b.meta["block"] == 128 and b.meta["dropped_tokens"] == 1000 - 7 * 128
    assert torch.equal(b.x.flatten(), torch.as_tensor(stream[:896], dtype=torch.int64))
    b = load_data(f"{tmp_path / 'corpus.npz'}?block=10", n_samples=5, seed=1)
    assert tuple(b.x.shape) == (5, 10) and b.meta["dropped_tokens"] == 0
    assert all(int(r[1] - r[0]) % 97 == 1 for r in b.x)  # rows are runs of consecutive tokens
    assert "block=10" in b.name
    for spec, msg in ((f"{tmp_path / 'corpus.npz'}?block=1", "at least 2"),
                      (f"{tmp_path / 'corpus.npz'}?block=2000", "fewer than one block"),
                      (f"{tmp_path / 'corpus.npz'}?block=ten", "whole number"),
                      ("digits?block=8", "token stream")):
        with pytest.raises(DataError, match=msg):
            load_data(spec)
    np.savez(tmp_path / "seqs.npz", x=stream.reshape(10, 100))
    with pytest.raises(DataError, match="1-D"):
        load_data(f"{tmp_path / 'seqs.npz'}?block=10")
    np.savez(tmp_path / "floats.npz", x=np.zeros(50, dtype=np.float32))
    with pytest.raises(DataError, match="'x' alone holding token ids"):
        load_data(tmp_path / "floats.npz")
