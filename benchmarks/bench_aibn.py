"""AIBN speed: forward + backward at ResNet-50 layer3 shapes.

CPU: the composite-op reference `aibn_ref` (what AIBN2d runs on CPU) next to `BatchNorm2d`'s
fused op, both timed in the same run. GPU (skipped without CUDA): the fused Triton kernels next
to `aibn_ref` and BatchNorm2d, float32 and bfloat16, channels-first and channels-last.

Layer3 of ResNet-50 at 256x128 input is (batch, 1024, 16, 8). Default batch 16 (CPU) / 64 (GPU);
IICS_BENCH_SCALE=large uses batch 64 on CPU too.

    pytest benchmarks/bench_aibn.py -s          # or: python -m benchmarks.bench_aibn
"""
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.gpu_specs.aibn import traffic_bytes
from iics_fast.kernels.aibn import aibn, aibn_ref

LARGE = os.environ.get("IICS_BENCH_SCALE", "small") == "large"


def _case(batch, device, dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, 1024, 16, 8)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    c = shape[1]
    params = dict(weight=torch.rand(c, generator=g).to(device) + 0.5, bias=torch.randn(c, generator=g).to(device),
                  alpha=torch.tensor([0.1]).to(device))
    stats = dict(running_mean=torch.zeros(c, device=device), running_var=torch.ones(c, device=device))
    return x, dy, params, stats


def _step(fn, x, dy, params, stats):
    """One training forward + backward; returns (y, grads)."""
    x = x.detach().requires_grad_()
    p = {k: v.detach().requires_grad_() for k, v in params.items()}
    y = fn(x, stats["running_mean"], stats["running_var"], p["weight"], p["bias"], p["alpha"], True, 0.1, 1e-5)
    y.backward(dy)
    return y, (x.grad, p["weight"].grad, p["bias"].grad, p["alpha"].grad)


def _bn(x, running_mean, running_var, weight, bias, alpha, training, momentum, eps):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _timed(fn, *args, repeat=5, sync=lambda: None):
    fn(*args)  # warm-up (and Triton compile on GPU)
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def _check_ref_against_float64(x, params, stats):
    """aibn_ref in float32 against Eq. 12 written out in float64 (training forward)."""
    y = aibn_ref(x, stats["running_mean"].clone(), stats["running_var"].clone(), **params, training=True)
    x64 = x.double().flatten(2)
    mu_in, var_in = x64.mean(-1), x64.var(-1)
    mu_bn = mu_in.mean(0)
    var_bn = var_in.mean(0) + (mu_in - mu_bn).square().mean(0)
    a = params["alpha"].double().clamp(0, 1)
    mean = a * mu_bn + (1 - a) * mu_in
    var = a * var_bn + (1 - a) * var_in
    y64 = (x64 - mean[..., None]) / (var[..., None] + 1e-5).sqrt()
    y64 = y64 * params["weight"].double()[None, :, None] + params["bias"].double()[None, :, None]
    torch.testing.assert_close(y.double().flatten(2), y64, rtol=1e-4, atol=1e-4)


def run_cpu(batch=None):
    batch = batch or (64 if LARGE else 16)
    x, dy, params, stats = _case(batch, "cpu")
    _check_ref_against_float64(x, params, stats)
    t_ref = _timed(_step, aibn_ref, x, dy, params, stats)
    t_bn = _timed(_step, _bn, x, dy, params, stats)
    print(f"\nCPU fwd+bwd, layer3 {tuple(x.shape)} float32, {torch.get_num_threads()} threads: "
          f"aibn_ref {t_ref * 1e3:.1f} ms, BatchNorm2d {t_bn * 1e3:.1f} ms, aibn_ref / BN = {t_ref / t_bn:.2f}x")
    return t_ref, t_bn


def run_gpu(batch=64):
    sync = torch.cuda.synchronize
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            x, dy, params, stats = _case(batch, "cuda", dtype, cl)
            y, grads = _step(aibn, x, dy, params, dict((k, v.clone()) for k, v in stats.items()))
            y_ref, grads_ref = _step(aibn_ref, x, dy, params, dict((k, v.clone()) for k, v in stats.items()))
            tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
            torch.testing.assert_close(y.float(), y_ref.float(), **tol)
            torch.testing.assert_close(grads[0].float(), grads_ref[0].float(), **tol)
            for a, b in zip(grads[1:], grads_ref[1:]):
                torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * max(1.0, b.abs().max().item()))
            t_k = _timed(_step, aibn, x, dy, params, stats, repeat=20, sync=sync)
            t_r = _timed(_step, aibn_ref, x, dy, params, stats, repeat=20, sync=sync)
            t_b = _timed(_step, _bn, x, dy, params, stats, repeat=20, sync=sync)
            rows.append((dtype, cl, t_k, t_r, t_b))
            print(f"GPU fwd+bwd {tuple(x.shape)} {str(dtype)[6:]} {'channels-last' if cl else 'channels-first'}: "
                  f"Triton {t_k * 1e6:.0f} us, aibn_ref {t_r * 1e6:.0f} us ({t_r / t_k:.1f}x), "
                  f"BatchNorm2d {t_b * 1e6:.0f} us")
    return rows


class _Traffic(TorchDispatchMode):
    """Bytes every non-view aten op reads and writes of activation-sized tensors (one kernel an op,
    no cache reuse: eager PyTorch on a GPU). Broadcast views count their storage only."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.bytes, self.ops = numel, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            moved = sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
                        for t in tree_flatten((args, kwargs, out))[0]
                        if isinstance(t, torch.Tensor) and t.numel() >= self.numel)
            self.bytes += moved
            self.ops += moved > 0
        return out


def reference_traffic(shape=(4, 256, 16, 8)):
    """Bytes per activation element of aibn_ref in float32, counted op by op (layer3's
    H*W = 16 * 8): (training forward, training backward, eval forward, op counts)."""
    c = shape[1]
    x, dy = torch.randn(shape).requires_grad_(), torch.randn(shape)
    p = dict(weight=torch.ones(c, requires_grad=True), bias=torch.zeros(c, requires_grad=True),
             alpha=torch.full((1,), 0.1, requires_grad=True))
    with _Traffic(x.numel()) as fwd:
        y = aibn_ref(x, torch.zeros(c), torch.ones(c), **p, training=True)
    with _Traffic(x.numel()) as bwd:
        y.backward(dy)
    with torch.no_grad(), _Traffic(x.numel()) as ev:
        aibn_ref(x, torch.zeros(c), torch.ones(c), **p, training=False)
    n = x.numel()
    return fwd.bytes / n, bwd.bytes / n, ev.bytes / n, (fwd.ops, bwd.ops, ev.ops)


def run_traffic(batch=64, hbm=3.35e12):
    """Bytes per element of the fused kernels (their traffic model) and of the reference (counted),
    and the H100 time that implies at layer3 (batch, 1024, 16, 8) if memory bound."""
    n_el = batch * 1024 * 128
    rf, rb, re, (nf, nb, ne) = reference_traffic()
    print(f"\naibn_ref float32 training: forward {rf:.1f} B/element ({nf} activation-sized ops), "
          f"backward {rb:.1f} B/element ({nb} ops); H100 at layer3 batch {batch}: {(rf + rb) * n_el / hbm * 1e6:.0f} us")
    print(f"aibn_ref float32 eval forward: {re:.1f} B/element ({ne} ops); {re * n_el / hbm * 1e6:.0f} us")
    fused = {}
    for name, size in (("float32", 4), ("bfloat16", 2)):
        t = traffic_bytes(batch, 1024, 128, size)
        f = (t["stats"] + t["fwd_finalize"] + t["apply"]) / n_el
        b = (t["bwd_reduce"] + t["bwd_finalize"] + t["bwd_apply"]) / n_el
        e = t["eval"] / n_el
        fused[name] = f + b
        print(f"fused {name}: forward {f:.2f} B/element, backward {b:.2f} B/element; "
              f"H100 at layer3 batch {batch}: {(f + b) * n_el / hbm * 1e6:.0f} us "
              f"(float32 reference / this = {(rf + rb) / (f + b):.1f}x); eval forward {e:.2f} B/element, "
              f"{e * n_el / hbm * 1e6:.0f} us ({re / e:.1f}x less than the reference)")
    net = _resnet50_aibn_elements() * batch
    print(f"ResNet-50, all {len(_AIBN_SHAPES)} AIBN layers at 256x128 batch {batch} ({net / 1e6:.1f} M elements), "
          f"one training step on H100: reference {(rf + rb) * net / hbm * 1e3:.2f} ms, fused float32 "
          f"{fused['float32'] * net / hbm * 1e3:.2f} ms")
    return rf, rb


_AIBN_SHAPES: list = []


def _resnet50_aibn_elements() -> int:
    """Activation elements per image entering ResNet-50's AIBN layers at 256x128."""
    from iics_fast.models import AIBN2d, build_backbone

    model = build_backbone("resnet50").eval()
    _AIBN_SHAPES.clear()
    for mod in model.modules():
        if isinstance(mod, AIBN2d):
            mod.register_forward_hook(lambda m, i, o: _AIBN_SHAPES.append(i[0][0].numel()) and None)
    with torch.no_grad():
        model(torch.randn(1, 3, 256, 128))
    return sum(_AIBN_SHAPES)


def test_bench_aibn_traffic():
    rf, rb = run_traffic()
    assert rf >= 8 * 4 and rb >= 8 * 4  # the composite ops pass over the activation many times


def test_bench_aibn_cpu():
    run_cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_aibn_gpu():
    run_gpu()


if __name__ == "__main__":
    run_traffic()
    run_cpu()
    if torch.cuda.is_available():
        run_gpu()
