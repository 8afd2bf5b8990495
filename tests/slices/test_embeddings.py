"""Representations by forward hooks, against direct computation; the model is left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nndiag._utils.model_state import same_snapshot, snapshot
from nndiag._utils.seeding import fork_rng
from nndiag.errors import DataError, InputError
from nndiag.io.data import load_data
from nndiag.models import build_model
from nndiag.slices.embeddings import extract_embeddings, load_embeddings


@pytest.fixture(scope="module")
def data():
    return load_data("digits", n_samples=300, seed=0)


def test_default_is_input_of_final_linear(data):
    with fork_rng(0):
        model = build_model("digits-mlp")
    emb = extract_embeddings(model, data, batch_size=64)
    with torch.no_grad():
        z = model.net[:-1](data.x).double().numpy()
        logits = model(data.x).double()
    assert emb.layer == "net.5 (input)"
    np.testing.assert_allclose(emb.z, z, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(emb.losses, F.cross_entropy(logits, data.y, reduction="none").numpy(), rtol=1e-6)
    np.testing.assert_array_equal(emb.preds, logits.argmax(1).numpy())
    np.testing.assert_array_equal(emb.labels, data.y.numpy())
    np.testing.assert_allclose(emb.probs.sum(1), 1.0)


def test_final_linear_found_by_execution_order_not_registration():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 10)  # registered first, runs last
            self.body = nn.Linear(64, 8)

        def forward(self, x):
            return self.head(torch.relu(self.body(x.flatten(1))))

    with fork_rng(1):
        model = Odd()
    x = torch.randn(20, 1, 8, 8)
    emb = extract_embeddings(model, (x, torch.zeros(20, dtype=torch.long)))
    assert emb.layer == "head (input)"
    with torch.no_grad():
        np.testing.assert_allclose(emb.z, torch.relu(model.body(x.flatten(1))).double().numpy(), rtol=1e-6)


def test_named_layer_output_and_state_left_alone(data):
    with fork_rng(0):
        model = build_model("digits-cnn")
    model.train()
    model.features[0].weight.requires_grad_(False)
    model(data.x[:4]).sum().backward()
    handle = model.register_forward_hook(lambda *a: None)
    before = snapshot(model)
    emb = extract_embeddings(model, data, layer="features")
    assert same_snapshot(before, snapshot(model))
    assert model.training
    model.eval()
    with torch.no_grad():
        ref = model.features(data.x).flatten(1).double().numpy()
    np.testing.assert_allclose(emb.z, ref, rtol=1e-5, atol=1e-6)
    handle.remove()


def test_unknown_layer_lists_valid_names(data):
    model = build_model("digits-mlp")
    with pytest.raises(InputError, match=r"unknown layer 'nope'; valid layer names: net, net\.0"):
        extract_embeddings(model, data, layer="nope")


def test_model_without_linear_needs_a_layer():
    model = nn.Sequential(nn.Flatten(), nn.Identity())
    with pytest.raises(InputError, match="no nn.Linear"):
        extract_embeddings(model, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))


def test_load_user_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    z, loss = rng.normal(size=(50, 4)), rng.random(50)
    np.savez(tmp_path / "e.npz", embeddings=z, losses=loss, labels=np.arange(50) % 3)
    e = load_embeddings(tmp_path / "e.npz")
    np.testing.assert_array_equal(e.z, z)
    np.testing.assert_array_equal(e.losses, loss)
    assert e.labels is not None and e.preds is None and e.correct is None
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "l.npy", loss)
    e2 = load_embeddings(tmp_path / "z.npy", tmp_path / "l.npy")
    np.testing.assert_array_equal(e2.z, z)
    with pytest.raises(DataError, match="needs an embeddings array"):
        load_embeddings(tmp_path / "z.npy")
    z[5, 2] = np.nan
    np.savez(tmp_path / "bad.npz", z=z, loss=loss)
    with pytest.raises(InputError, match="1 embedding row"):
        load_embeddings(tmp_path / "bad.npz")


def test_token_ids_reach_the_embedding_layer():
    from tests.landscape._dense import tiny_embedding, token_data

    x, y = token_data()
    model = tiny_embedding()
    emb = extract_embeddings(model, (x, y), batch_size=20)
    with torch.no_grad():
        z = model[:-1](x).double().numpy()
        logits = model(x).double()
    assert emb.layer == "3 (input)"
    np.testing.assert_allclose(emb.z, z, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(emb.losses, F.cross_entropy(logits, y, reduction="none").numpy(), rtol=1e-6)
    with pytest.raises(DataError, match="token ids must lie in"):
        extract_embeddings(model, (x + 11, y))
