"""`preserved` restores everything an analysis could disturb, also on error."""

from __future__ import annotations

import pytest
import torch

from nndiag._utils.model_state import preserved, same_snapshot, snapshot
from nndiag._utils.threads import limit_threads
from nndiag.models import build_model


def test_preserved_restores_mode_flags_grads_hooks_and_values():
    m = build_model("digits-cnn", batchnorm=True)
    m.eval()
    m.features[0].weight.requires_grad_(False)
    m(torch.randn(2, 1, 8, 8)).sum().backward()
    m.register_forward_hook(lambda *a: None)
    before = snapshot(m)
    with pytest.raises(RuntimeError), preserved(m):
        m.train()
        for p in m.parameters():
            p.requires_grad_(True)
            p.grad = None
        m.register_forward_hook(lambda *a: None)
        with torch.no_grad():
            m.classifier[1].weight.add_(1.0)
        m(torch.randn(4, 1, 8, 8))  # updates BN running stats in train mode
        raise RuntimeError("analysis failed")
    assert same_snapshot(before, snapshot(m))


def test_preserved_restores_hooks_added_to_empty_modules_and_removed_ones():
    m = build_model("digits-mlp")
    kept = m.register_forward_pre_hook(lambda *a: None)
    sub = next(c for c in m.modules() if c is not m and not c._forward_hooks)
    before = snapshot(m)
    with preserved(m, values=False):
        kept.remove()  # an existing hook taken away ...
        sub.register_forward_hook(lambda *a: None)  # ... and one added where there was none
        sub.register_full_backward_hook(lambda *a: None)
    assert len(m._forward_pre_hooks) == 1 and not sub._forward_hooks and not sub._backward_hooks
    assert same_snapshot(before, snapshot(m))


def test_snapshot_detects_changes():
    m = build_model("digits-mlp")
    before = snapshot(m)
    m.train(False)
    assert not same_snapshot(before, snapshot(m))


def test_limit_threads_sets_and_restores():
    old = torch.get_num_threads()
    with limit_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
        from threadpoolctl import threadpool_info

        assert all(i["num_threads"] == 1 for i in threadpool_info())
    assert torch.get_num_threads() == old


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    from nndiag._utils.files import atomic_write

    p = atomic_write(tmp_path / "sub" / "r.json", "old")
    with pytest.raises(TypeError):
        atomic_write(p, 123)  # type: ignore[arg-type]
    assert p.read_text() == "old" and sorted(x.name for x in p.parent.iterdir()) == ["r.json"]
