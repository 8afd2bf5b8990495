"""CUDA results equal the CPU's (runs only where CUDA is available; CI has none).

Everything here was first checked on an H100 through ``benchmarks/gpu_check.py``; these tests
keep the CUDA paths that the CPU suite cannot reach (models and data on the GPU) under test on
any GPU machine.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cnn(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(),
                         nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), norm(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _xy(n: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_every_proxy_on_a_cuda_model_matches_the_cpu():
    from nndiag.zerocost.score import compute_proxies, parse_proxies

    net, (x, y) = _cnn(), _xy()
    names = parse_proxies("all")
    cpu = compute_proxies(net, x, y, names)
    gpu = compute_proxies(copy.deepcopy(net).cuda(), x, y, names)
    assert gpu["errors"] == {} and cpu["errors"] == {}
    for k in names:
        # GraSP (-θᵀHg, a small difference of large terms) moved 1.7e-2 between devices on
        # NB201 nets, GradSign counts signs of near-zero entries: both compared elsewhere
        if k not in ("grasp", "gradsign") and math.isfinite(cpu[k]):
            assert gpu[k] == pytest.approx(cpu[k], rel=2e-2, abs=1e-6), k


def test_gradsign_loop_equals_fast_on_cuda_in_float64():
    from nndiag.zerocost.gradsign import gradsign

    net, (x, y) = _cnn(), _xy()
    g = copy.deepcopy(net).cuda()
    loop = gradsign(g, x, y, method="loop", dtype=torch.float64)
    fast = gradsign(g, x, y, method="fast", dtype=torch.float64)
    assert loop == fast == gradsign(net, x, y, method="loop", dtype=torch.float64)


def test_hessian_top_eigenvalues_on_cuda_match_dense():
    from nndiag.landscape import hessian_spectrum

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    params = dict(net.named_parameters())
    flat = torch.cat([p.detach().flatten() for p in params.values()])

    def loss_of(v: torch.Tensor) -> torch.Tensor:
        ps, i = {}, 0
        for n, p in params.items():
            ps[n] = v[i:i + p.numel()].view(p.shape)
            i += p.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(net, ps, (x,)), y)

    dense = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat)).flip(0)[:3]
    r = hessian_spectrum(net, (x, y), top_k=3, device="cuda", dtype=torch.float64, tol=1e-8)
    torch.testing.assert_close(torch.as_tensor(r.eigenvalues), dense, rtol=1e-6, atol=1e-9)


def test_hessian_engines_on_cuda_equal_the_cpu_products():
    from nndiag.landscape import HessianOperator

    net, (x, y) = _cnn(), _xy(24)
    net = net.eval()
    cpu = HessianOperator(net, (x, y), batch_size=10, dtype=torch.float64)
    V = torch.randn(4, cpu.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = cpu.matmat(V)
    gnet = copy.deepcopy(net).cuda()
    for engine in ("auto", "double-backward", "forward-over-reverse"):
        op = HessianOperator(gnet, (x, y), batch_size=10, dtype=torch.float64, engine=engine)
        got = op.matmat(V).cpu()
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
        assert op.engine in ("double-backward", "forward-over-reverse")
        torch.testing.assert_close(op.matvec(V[1]).cpu(), ref[1], rtol=1e-9, atol=1e-12)


def test_spectra_on_cuda_equal_cpu_float64():
    from nndiag.spectral import analyze

    net = _cnn(bn=False)
    a = analyze(net, device="cuda", min_evals=4).layers.set_index("name")
    b = analyze(net, device="cpu", precision="float64", min_evals=4).layers.set_index("name")
    for col in ("lambda_max", "log_norm", "stable_rank", "alpha"):
        torch.testing.assert_close(torch.as_tensor(a[col].to_numpy(float)), torch.as_tensor(b[col].to_numpy(float)),
                                   rtol=1e-9, atol=0, equal_nan=True)


def test_slices_cli_on_cuda(tmp_path):
    import json

    from typer.testing import CliRunner

    from nndiag.cli.app import app
    from nndiag.models import build_model

    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.save(build_model("digits-mlp").state_dict(), path)
    res = CliRunner().invoke(app, ["slices", str(path), "--arch", "digits-mlp", "--data", "digits",
                                   "--n-samples", "300", "--n", "2", "--size", "0.05", "--steps", "100",
                                   "--device", "cuda", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["tables"]["slices"]) == 2


@pytest.mark.parametrize("strategy", ["graph", "auto"])
def test_landscape_strategies_on_cuda_equal_the_cpu_loop(strategy):
    from nndiag.landscape import surface

    net, (x, y) = _cnn(), _xy(32)
    net.eval()
    ref = surface(net, (x, y), dim=2, steps=5, seed=1, strategy="loop", dtype=torch.float64)
    gpu = surface(copy.deepcopy(net).cuda(), (x.cuda(), y.cuda()), dim=2, steps=5, seed=1,
                  strategy=strategy, dtype=torch.float64)
    assert gpu.params["strategy"] in ("vmap", "loop", "graph")
    if strategy == "graph":
        assert gpu.params["strategy"] == "graph"
    torch.testing.assert_close(torch.as_tensor(gpu.losses), torch.as_tensor(ref.losses), rtol=1e-9, atol=1e-12)


def test_split_trace_on_cuda_matches_the_exact_trace():
    # second-order forward passes and output-space probes with the model on the GPU
    from nndiag.landscape import HessianOperator, exact_trace, hessian_spectrum

    net, (x, y) = _cnn(), _xy(24)
    net = net.double().eval()
    exact = exact_trace(HessianOperator(net, (x, y), dtype=torch.float64).matmat,
                        sum(p.numel() for p in net.parameters()), block=64, dtype=torch.float64).value
    gpu = copy.deepcopy(net).cuda()
    r = hessian_spectrum(gpu, (x, y), top_k=0, trace=True, trace_rtol=0.02, trace_probes=4000,
                         dtype=torch.float64)
    assert r.params["trace_method"] == "split" and r.meta["device"].startswith("cuda")
    assert abs(r.trace - exact) < 4 * r.trace_stderr


@pytest.mark.parametrize("strategy", ["loop", "vmap", "graph"])
def test_landscape_on_cuda_equals_the_cpu_grid_with_its_precomputed_first_layer(strategy):
    # the CPU's bound copy computes the first convolution once per direction; the GPU runs
    # whole forwards (the bound copy and the precomputation are CPU-only)
    from nndiag.landscape import surface

    net, (x, y) = _cnn(bn=False), _xy(32)
    net = net.double().eval()
    x = x.double()
    ref = surface(net, (x, y), dim=2, steps=5, seed=1, strategy="loop", dtype=torch.float64, device="cpu",
                  threads=1, batch_size=12)
    assert ref.params["first_layer_precomputed"] == "0"
    gpu = surface(copy.deepcopy(net).cuda(), (x.cuda(), y.cuda()), dim=2, steps=5, seed=1, strategy=strategy,
                  dtype=torch.float64, batch_size=12)
    assert gpu.params["first_layer_precomputed"] is None and gpu.params["strategy"] == strategy
    torch.testing.assert_close(torch.as_tensor(gpu.losses), torch.as_tensor(ref.losses), rtol=1e-9, atol=1e-12)


def test_eigenvalues_density_and_trace_on_cuda_equal_the_cpu():
    # the eigenvalue Lanczos run doubles as the density's first run; probes drawn on the host
    from nndiag.landscape import hessian_spectrum

    net, (x, y) = _cnn(bn=False), _xy(24)
    net = net.double().eval()
    kw = dict(top_k=2, density=True, slq_runs=2, slq_steps=12, trace=True, trace_method="hutchpp",
              trace_probes=30, dtype=torch.float64)
    cpu = hessian_spectrum(net, (x, y), device="cpu", **kw)
    gpu = hessian_spectrum(copy.deepcopy(net).cuda(), (x, y), **kw)
    assert gpu.meta["device"].startswith("cuda") and gpu.density.settings["first_run_shared"] is True
    np.testing.assert_allclose(gpu.eigenvalues, cpu.eigenvalues, rtol=1e-8)
    np.testing.assert_allclose(gpu.trace, cpu.trace, rtol=1e-8)
    for a, b in zip(gpu.density.nodes, cpu.density.nodes, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    for k in ("re", "Kh", "Ct"):
        assert gpu.criteria[k] == pytest.approx(cpu.criteria[k], rel=1e-6, abs=1e-9), k


class _FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6 * 64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c(x)).flatten(1).relu_())


def test_nwot_with_functional_relus_on_cuda_equals_the_cpu():
    from nndiag.zerocost.score import compute_proxies

    torch.manual_seed(0)
    net, (x, y) = _FunctionalRelu(), _xy(16)
    cpu = compute_proxies(net, x, y, ["nwot"])
    gpu = compute_proxies(copy.deepcopy(net).cuda(), x, y, ["nwot"])
    assert cpu["errors"] == {} and gpu["errors"] == {}
    assert gpu["nwot"] == pytest.approx(cpu["nwot"], rel=1e-6)


def test_input_scale_check_on_a_cuda_model_equals_the_cpu():
    from nndiag.report.input_scale import input_scale_finding

    net = _cnn(bn=False).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(40, 3, 8, 8, generator=g), torch.randint(0, 5, (40,), generator=g)
    _, cpu = input_scale_finding(net, x, y, normalize=None)
    _, gpu = input_scale_finding(copy.deepcopy(net).cuda(), x, y, normalize=None)
    assert set(gpu) == set(cpu) >= {"as given", "imagenet", "cifar", "inception", "clip", "standard", "bgr"}
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], rel=1e-4), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_language_model_hessian_on_cuda_equals_the_cpu(dtype):
    # fused CUDA attention kernels may lack the derivative of their backward (double backward)
    transformers = pytest.importorskip("transformers")
    from nndiag.landscape import HessianOperator, hessian_spectrum, lm_loss

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_inner=64, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    x = torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(1))
    cpu = HessianOperator(model, (x, x), loss=lm_loss, dtype=torch.float64)
    v = torch.randn(cpu.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = cpu.matvec(v)
    gpu_model = copy.deepcopy(model).cuda()
    for engine in ("double-backward", "forward-over-reverse"):
        op = HessianOperator(gpu_model, (x, x), loss=lm_loss, dtype=dtype, engine=engine)
        got = op.matvec(v.to(dtype).cuda()).double().cpu()
        tol = 1e-9 if dtype == torch.float64 else 2e-3
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.abs().max()))
    r = hessian_spectrum(gpu_model, (x, x), loss=lm_loss, top_k=2, dtype=dtype, tol=1e-6)
    c = hessian_spectrum(model, (x, x), loss=lm_loss, top_k=2, dtype=torch.float64, tol=1e-6, device="cpu")
    np.testing.assert_allclose(r.eigenvalues, c.eigenvalues, rtol=1e-8 if dtype == torch.float64 else 1e-3)


def _pooled_cnn() -> nn.Module:
    # the digits CNN's pattern: ReLU read only by a 2×2 max-pooling, a (N, C, H, W) flatten into
    # a linear layer (both rewritten by ``fold`` for CPU grids: the ReLU after the pooling, the
    # flatten read in channels-last order with the layer's columns permuted per point)
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, 5))


@pytest.mark.parametrize("strategy", ["loop", "vmap", "graph"])
def test_landscape_fold_rewrites_on_cuda_equal_the_plain_cpu_model(strategy):
    from nndiag.landscape import surface

    net, (x, y) = _pooled_cnn(), _xy(32)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    net = net.double().eval()
    x = x.double()
    with torch.no_grad():
        plain = float(nn.functional.cross_entropy(net(x), y))
    ref = surface(net, (x, y), dim=2, steps=5, seed=2, strategy="loop", dtype=torch.float64, device="cpu",
                  threads=1)
    gpu = surface(copy.deepcopy(net).cuda(), (x.cuda(), y.cuda()), dim=2, steps=5, seed=2, strategy=strategy,
                  dtype=torch.float64)
    # the CPU grid runs the rewritten copy; the GPU's whole forwards run the model as it is
    assert ref.params["flattens_channels_last"] == 1 and ref.params["pools_rewritten"] == 2
    assert ref.params["batchnorm_folded"] == 1
    assert gpu.params["strategy"] == strategy
    assert (gpu.params["flattens_channels_last"], gpu.params["pools_rewritten"], gpu.params["batchnorm_folded"]) \
        == (0, 0, 0)
    assert gpu.origin_loss == pytest.approx(plain, rel=1e-12)
    torch.testing.assert_close(torch.as_tensor(gpu.losses), torch.as_tensor(ref.losses), rtol=1e-9, atol=1e-12)


def test_fold_flatten_rewrite_takes_a_host_example_for_a_cuda_model():
    from nndiag.landscape.fold import inference_copy

    net, (x, _) = _pooled_cnn(), _xy(8)
    net = net.eval().cuda()
    folded = inference_copy(net, example=x[:2])  # the example on the host, the model on the GPU
    assert folded is not None and [c for _, c in folded.flattened] == [(8, 2, 2)]
    p = {k: v.detach() for k, v in net.named_parameters()}
    b = {k: v for k, v in net.named_buffers()}
    with torch.no_grad():
        got = torch.func.functional_call(folded.module, folded.params(p, b), (x.cuda(),))
        torch.testing.assert_close(got, net(x.cuda()), rtol=1e-5, atol=1e-5)
