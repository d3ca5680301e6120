"""AIBN: the reference against Eq. 12 in float64, the fused kernels against the reference."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import iics_fast.kernels.aibn as aibn_module
from benchmarks.gpu_report import compile_report
from benchmarks.gpu_specs.aibn import COMPILE_SPECS
from iics_fast.kernels.aibn import aibn, aibn_ref
from iics_fast.models import AIBN2d


def eq12_float64(x, running_mean, running_var, weight, bias, alpha, training, momentum=0.1, eps=1e-5):
    """Eq. 12 transcribed independently in NumPy float64: (y, new running mean, new running var)."""
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    mu_in = flat.mean(-1)
    var_in = flat.var(-1, ddof=1) if h * w > 1 else np.full((n, c), np.nan)
    rm, rv = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    if training:
        mu_bn = mu_in.mean(0)
        var_bn = var_in.mean(0) + ((mu_in - mu_bn) ** 2).mean(0)
        rm, rv = (1 - momentum) * rm + momentum * mu_bn, (1 - momentum) * rv + momentum * var_bn
    else:
        mu_bn, var_bn = rm, rv
    a = min(max(float(alpha), 0.0), 1.0)
    mean = a * mu_bn[None] + (1 - a) * mu_in
    var = a * var_bn[None] + (1 - a) * var_in
    y = (flat - mean[..., None]) / np.sqrt(var[..., None] + eps)
    y = y * np.asarray(weight, np.float64)[None, :, None] + np.asarray(bias, np.float64)[None, :, None]
    return y.reshape(n, c, h, w), rm, rv


def _inputs(shape, rng, dtype=torch.float32, alpha=0.3, offset=1.0):
    c = shape[1]
    t = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    x = (t(*shape) * 2 + offset).to(dtype)
    return dict(
        x=x, weight=t(c) * 0.5 + 1, bias=t(c), alpha=torch.tensor([alpha]),
        running_mean=t(c), running_var=torch.from_numpy(rng.uniform(0.5, 2.0, c).astype(np.float32)),
    )


def _run(fn, inp, training, grad_out, momentum=0.1, layout=torch.contiguous_format):
    """Forward + backward of fn; returns outputs, every gradient and the updated running stats."""
    x = inp["x"].clone().to(memory_format=layout).requires_grad_()
    w, b, a = (inp[k].clone().requires_grad_() for k in ("weight", "bias", "alpha"))
    rm, rv = inp["running_mean"].clone(), inp["running_var"].clone()
    y = fn(x, rm, rv, w, b, a, training, momentum, 1e-5)
    y.backward(grad_out)
    return dict(y=y, dx=x.grad, dweight=w.grad, dbias=b.grad, dalpha=a.grad, running_mean=rm, running_var=rv)


# ---------------------------------------------------------------------------------------------
# aibn_ref against Eq. 12


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (1, 2, 3, 1)])
@pytest.mark.parametrize("alpha", [0.3, 0.0, 1.0])
def test_ref_matches_eq12_float64(rng, training, shape, alpha):
    inp = _inputs(shape, rng, dtype=torch.float64, alpha=alpha)
    rm, rv = inp["running_mean"].double(), inp["running_var"].double()
    y = aibn_ref(inp["x"], rm, rv, inp["weight"].double(), inp["bias"].double(), inp["alpha"].double(), training)
    y64, rm64, rv64 = eq12_float64(inp["x"], inp["running_mean"], inp["running_var"], inp["weight"],
                                   inp["bias"], inp["alpha"], training)
    np.testing.assert_allclose(y.numpy(), y64, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(rm.numpy(), rm64, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv.numpy(), rv64, rtol=1e-10, atol=1e-12)


def test_ref_batch_sums_of_split_batches_equal_the_whole_batch(rng):
    # the hook the multi-process training uses: the sums of both halves of a batch given to
    # each half reproduce the whole batch's output, running statistics and gradients
    inp = _inputs((6, 3, 4, 5), rng, dtype=torch.float64, alpha=0.4)
    x = inp["x"].requires_grad_()
    args = (inp["weight"].double(), inp["bias"].double(), inp["alpha"].double())
    rm, rv = inp["running_mean"].double(), inp["running_var"].double()
    whole = aibn_ref(x, rm.clone(), rv.clone(), *args, True)
    (whole * torch.arange(whole.numel()).reshape(whole.shape).sin()).sum().backward()
    g_whole = x.grad.clone()
    x.grad = None
    halves = (slice(0, 2), slice(2, 6))
    xn = x.reshape(6, 3, 20)
    mu = xn.mean(-1, keepdim=True)
    second = (xn.var(-1, keepdim=True) + mu**2)
    totals = [(mu[h].sum(0, keepdim=True), second[h].sum(0, keepdim=True)) for h in halves]

    def over_both(s1, s2, n):
        return totals[0][0] + totals[1][0], totals[0][1] + totals[1][1], 6

    outs = []
    for h in halves:
        rmh, rvh = rm.clone(), rv.clone()
        outs.append(aibn_ref(x[h], rmh, rvh, *args, True, batch_sums=over_both))
    y = torch.cat(outs)
    torch.testing.assert_close(y, whole, rtol=1e-12, atol=1e-12)
    rm_whole, rv_whole = rm.clone(), rv.clone()
    aibn_ref(x.detach(), rm_whole, rv_whole, *args, True)
    torch.testing.assert_close(rmh, rm_whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rvh, rv_whole, rtol=1e-12, atol=1e-12)
    (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
    torch.testing.assert_close(x.grad, g_whole, rtol=1e-10, atol=1e-12)
    # AIBN2d forwards through it in training when given a sum over ranks (here one rank)
    m = AIBN2d(3, init_alpha=0.4).double()
    m.sum_ranks = lambda t: None
    torch.testing.assert_close(m(x.detach()), AIBN2d(3, init_alpha=0.4).double()(x.detach()))


def test_kernel_with_sum_over_one_rank_matches_plain_kernel(rng):
    # the ranks-synchronised launch path (given batch statistics, backward finalize in two
    # stages around the sum) with a single rank is the one-process kernel
    inp = _inputs((5, 6, 4, 3), rng, alpha=0.35)
    g = torch.from_numpy(rng.standard_normal((5, 6, 4, 3)).astype(np.float32))
    plain = _run(aibn, inp, True, g)
    calls = []
    synced = _run(lambda *a, **k: aibn(*a, **k, sum_ranks=calls.append), inp, True, g)
    assert len(calls) == 2  # forward statistics, backward batch-side sums
    for key, value in plain.items():
        torch.testing.assert_close(synced[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("alpha", [0.35, 1.4])
def test_ref_gradcheck(rng, training, alpha):
    inp = _inputs((3, 2, 3, 2), rng, dtype=torch.float64, alpha=alpha)
    x, w, b, a = (inp[k].double().requires_grad_() for k in ("x", "weight", "bias", "alpha"))
    rm, rv = inp["running_mean"].double(), inp["running_var"].double()
    fn = lambda x, w, b, a: aibn_ref(x, rm.clone(), rv.clone(), w, b, a, training)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, a))


# ---------------------------------------------------------------------------------------------
# Fused kernels (Triton interpreter without a GPU) against aibn_ref

TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}


def _compare(got, ref, dtype):
    for k in ref:
        tol = TOL[dtype] if k in ("y", "dx") else TOL[torch.float32]
        scale = max(1.0, ref[k].float().abs().max().item()) if k in ("dweight", "dbias", "dalpha") else 1.0
        torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=k)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 3), (2, 130, 4, 4), (1, 3, 40, 30)], ids=["odd", "c130", "hw1200"])
def test_kernel_matches_ref(rng, training, layout, shape):
    """Odd sizes; C over one finalize block; H*W over one tile (partial last tile); batch 1."""
    inp = _inputs(shape, rng)
    g = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    got = _run(aibn, inp, training, g, layout=layout)
    ref = _run(aibn_ref, inp, training, g, layout=layout)
    _compare(got, ref, torch.float32)
    assert got["y"].is_contiguous(memory_format=layout) and got["dx"].is_contiguous(memory_format=layout)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_kernel_eval_three_kernel_path(rng, monkeypatch, layout):
    """Eval with H*W beyond the one-pass eval kernel (forced small here) takes the stats /
    finalize / apply path with the running statistics."""
    monkeypatch.setattr(aibn_module, "EVAL_MAX_HW", 4)
    inp = _inputs((3, 5, 4, 3), rng)
    g = torch.from_numpy(rng.standard_normal((3, 5, 4, 3)).astype(np.float32))
    _compare(_run(aibn, inp, False, g, layout=layout), _run(aibn_ref, inp, False, g, layout=layout), torch.float32)


def test_kernel_finalize_walks_sample_tiles(rng, monkeypatch):
    """N over the finalize kernels' sample tile (forced small here), not a multiple of it."""
    monkeypatch.setattr(aibn_module, "FINALIZE_BLOCK_N", 2)
    inp = _inputs((5, 3, 2, 3), rng)
    g = torch.from_numpy(rng.standard_normal((5, 3, 2, 3)).astype(np.float32))
    for training in (True, False):
        _compare(_run(aibn, inp, training, g), _run(aibn_ref, inp, training, g), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_kernel_half_inputs(rng, dtype, training):
    inp = _inputs((3, 6, 5, 4), rng, dtype=dtype)
    g = torch.from_numpy(rng.standard_normal((3, 6, 5, 4)).astype(np.float32)).to(dtype)
    got = _run(aibn, inp, training, g, layout=torch.channels_last)
    ref = _run(aibn_ref, inp, training, g)
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype and got["dweight"].dtype == torch.float32
    _compare(got, ref, dtype)


def test_kernel_mixed_layouts_and_strided_input(rng):
    """x channels-last with a contiguous upstream gradient; a broadcast gradient; a non-dense x."""
    inp = _inputs((2, 4, 6, 5), rng)
    g = torch.from_numpy(rng.standard_normal((2, 4, 6, 5)).astype(np.float32))
    _compare(_run(aibn, inp, True, g, layout=torch.channels_last), _run(aibn_ref, inp, True, g), torch.float32)
    x = inp["x"].clone().requires_grad_()  # y.sum(): the upstream gradient is a stride-0 view
    ref_x = inp["x"].clone().requires_grad_()
    aibn(x, inp["running_mean"].clone(), inp["running_var"].clone(), inp["weight"], inp["bias"], inp["alpha"], True).sum().backward()
    aibn_ref(ref_x, inp["running_mean"].clone(), inp["running_var"].clone(), inp["weight"], inp["bias"], inp["alpha"],
             True).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, **TOL[torch.float32])
    big = _inputs((2, 4, 6, 10), rng)
    inp["x"] = big["x"][..., ::2]
    _compare(_run(aibn, inp, False, g), _run(aibn_ref, inp, False, g), torch.float32)


@pytest.mark.parametrize("training", [True, False])
def test_kernel_large_mean_is_accurate(rng, training):
    """|mean| >> std: the shifted sums keep var_in accurate in float32 (plain sums would not)."""
    inp = _inputs((4, 3, 8, 8), rng, offset=3000.0)
    rm = inp["running_mean"].clone()
    if not training:  # eval against running stats near the data, so y is O(1)
        rm = inp["x"].double().mean((0, 2, 3)).float()
    y = aibn(inp["x"], rm.clone(), inp["running_var"].clone(), inp["weight"], inp["bias"], inp["alpha"], training)
    y64, *_ = eq12_float64(inp["x"], rm, inp["running_var"], inp["weight"], inp["bias"], inp["alpha"], training)
    np.testing.assert_allclose(y.numpy(), y64, rtol=1e-3, atol=2e-3)


def test_kernel_batch_one(rng):
    """N = 1: training mixes the instance statistics with themselves; eval uses the running ones."""
    inp = _inputs((1, 4, 3, 5), rng)
    g = torch.from_numpy(rng.standard_normal((1, 4, 3, 5)).astype(np.float32))
    for training in (True, False):
        got = _run(aibn, inp, training, g)
        _compare(got, _run(aibn_ref, inp, training, g), torch.float32)
        assert all(torch.isfinite(v).all() for v in got.values())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("training", [True, False])
def test_hw_one_follows_reference_nan(rng, training):
    """H*W = 1: the unbiased instance variance is 0/0, so y is NaN as in the reference."""
    inp = _inputs((3, 4, 1, 1), rng)
    g = torch.ones(3, 4, 1, 1)
    with pytest.warns(UserWarning, match="degrees of freedom"):
        ref = _run(aibn_ref, inp, training, g)
    got = _run(aibn, inp, training, g)
    assert torch.isnan(ref["y"]).all() and torch.isnan(got["y"]).all()
    for k in ("dx", "dweight", "dalpha"):
        assert torch.isnan(ref[k]).all() and torch.isnan(got[k]).all(), k
    torch.testing.assert_close(got["dbias"], ref["dbias"])  # sum of g: still finite
    torch.testing.assert_close(got["running_var"], ref["running_var"], equal_nan=True)
    with pytest.raises(ValueError, match=r"H\*W >= 2"):
        AIBN2d(4)(inp["x"])


# ---------------------------------------------------------------------------------------------
# alpha clamp, running statistics


@pytest.mark.parametrize("fn", [aibn, aibn_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize("training", [True, False])
def test_alpha_clamp(rng, fn, training):
    inp = _inputs((3, 4, 5, 3), rng)
    g = torch.from_numpy(rng.standard_normal((3, 4, 5, 3)).astype(np.float32))
    for outside, bound in ((-0.7, 0.0), (1.6, 1.0)):
        out = _run(fn, dict(inp, alpha=torch.tensor([outside])), training, g)
        at = _run(fn, dict(inp, alpha=torch.tensor([bound])), training, g)
        torch.testing.assert_close(out["y"], at["y"], rtol=0, atol=0)
        assert out["dalpha"].item() == 0.0
        assert at["dalpha"].item() != 0.0  # torch.clamp passes the gradient at the bounds
        torch.testing.assert_close(out["dx"], at["dx"], rtol=0, atol=0)
    if not training:  # alpha = 1 in eval is BatchNorm with the running statistics
        bn = torch.nn.functional.batch_norm(inp["x"], inp["running_mean"], inp["running_var"], inp["weight"],
                                            inp["bias"], False, 0.1, 1e-5)
        torch.testing.assert_close(at["y"], bn, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [aibn, aibn_ref], ids=["kernel", "ref"])
def test_running_statistics(rng, fn):
    inp = _inputs((5, 3, 4, 6), rng)
    g = torch.zeros(5, 3, 4, 6)
    out = _run(fn, inp, True, g, momentum=0.3)
    _, rm64, rv64 = eq12_float64(inp["x"], inp["running_mean"], inp["running_var"], inp["weight"], inp["bias"],
                                 inp["alpha"], True, momentum=0.3)
    np.testing.assert_allclose(out["running_mean"].numpy(), rm64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["running_var"].numpy(), rv64, rtol=1e-5, atol=1e-6)
    # var_bn = mean_n var_in (unbiased over H*W) + biased variance over n of mu_in
    x64 = inp["x"].double()
    var_bn = x64.var((2, 3), unbiased=True).mean(0) + x64.mean((2, 3)).var(0, unbiased=False)
    np.testing.assert_allclose(rv64, 0.7 * inp["running_var"].double().numpy() + 0.3 * var_bn.numpy(), rtol=1e-12)
    ev = _run(fn, inp, False, g)
    assert torch.equal(ev["running_mean"], inp["running_mean"]) and torch.equal(ev["running_var"], inp["running_var"])


# ---------------------------------------------------------------------------------------------
# module, input checks, compile


def test_module_parameters_and_sharing(rng):
    first = AIBN2d(6, init_alpha=0.25)
    second = AIBN2d(6, alpha=first.alpha)
    assert second.alpha is first.alpha and first.alpha.shape == (1,) and first.alpha.item() == 0.25
    assert {n for n, _ in first.named_parameters()} == {"weight", "bias", "alpha"}
    assert {n for n, _ in first.named_buffers()} == {"running_mean", "running_var"}
    assert first.eps == 1e-5 and first.momentum == 0.1
    x = torch.from_numpy(rng.standard_normal((2, 6, 4, 4)).astype(np.float32))
    y = second(first(x))
    y.sum().backward()
    assert first.alpha.grad is not None
    first.eval()
    rm = first.running_mean.clone()
    first(x)
    assert torch.equal(first.running_mean, rm)
    with pytest.raises(TypeError, match="nn.Parameter"):
        AIBN2d(6, alpha=torch.zeros(1))
    with pytest.raises(ValueError, match=r"\(N, 6, H, W\)"):
        first(torch.zeros(2, 5, 4, 4))


def test_launcher_rejects_bad_input(rng):
    inp = _inputs((2, 3, 4, 4), rng)
    args = lambda **kw: {**{k: inp[k] for k in ("x", "running_mean", "running_var", "weight", "bias", "alpha")}, **kw}  # noqa: E731
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        aibn(**args(x=inp["x"].double()))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        aibn(**args(weight=torch.ones(4)))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        aibn(**args(x=inp["x"][0]))
    with pytest.raises(ValueError, match="alpha must be one value"):
        aibn(**args(alpha=torch.ones(2)))
    with pytest.raises(TypeError, match="running_var must be a contiguous float32"):
        aibn(**args(running_var=inp["running_var"].double()))


def test_compile_sm80_sm90_no_spills():
    """Kernels compile for real GPU targets with zero spills (a spread of kernels, dtypes, layouts;
    `python -m benchmarks.gpu_report` compiles all of COMPILE_SPECS)."""
    wanted = [("aibn_stats_fp32_cf", 90), ("aibn_bwd_apply_bf16_cl", 80), ("aibn_bwd_finalize_train", 90),
              ("aibn_eval_bf16_cl", 80)]
    specs = {s.name: s for s in COMPILE_SPECS}
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda w: compile_report(specs[w[0]], w[1]), wanted))
    for r in reports:
        assert r.spill_bytes == 0 and 0 < r.registers <= 255, r
