"""DATA specs and Python data inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nndiag.errors import DataError
from nndiag.io.data import as_data, load_data


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
