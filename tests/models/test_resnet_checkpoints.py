"""The pretrained CIFAR-10 ResNets in ../shared load strictly and reach their accuracy."""

from __future__ import annotations

import pytest
import torch

from nndiag._utils.threads import limit_threads
from nndiag._utils.training import accuracy
from nndiag.io.data import load_data
from nndiag.io.models import load_model
from nndiag.models import build_model
from tests.conftest import shared_asset

PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018}


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_match_published(name):
    assert sum(p.numel() for p in build_model(name).parameters()) == PARAMS[name]


@pytest.fixture(scope="module")
def cifar_1000():
    path = shared_asset("data", "cifar10_test_5k.npz")
    return load_data(f"{path}?normalize=imagenet").take(torch.arange(1000))


@pytest.mark.parametrize("name", list(PARAMS))
def test_pretrained_checkpoint_loads_strict_and_is_accurate(name, cifar_1000):
    ckpt = shared_asset("models", f"cifar10_{name}.th")
    lm = load_model(ckpt, arch=name)  # strict: raises on any missing/unexpected key
    assert lm.module is not None
    with limit_threads(), torch.no_grad():
        acc = accuracy(lm.module.eval(), cifar_1000, batch_size=250)
    # published 91.8-93.6 % on original CIFAR-10; the JPEG re-encodings cost ~10 points
    assert acc >= 0.75, f"{name}: {acc:.3f}"
