r"""AIBN (adaptive instance-batch normalisation, Eq. 12 of IICS): fused Triton forward and backward.

For x of shape (N, C, H, W), m = H*W, per (n, c):

    mu_in  = mean_i x_i                      var_in = sum_i (x_i - mu_in)^2 / (m - 1)   (UNBIASED)
    mu_bn  = mean_n mu_in                    var_bn = mean_n (var_in + mu_in^2) - mu_bn^2  (training)
    mu_bn, var_bn = running_mean, running_var                                            (eval)
    a = clamp(alpha, 0, 1),  mu = a mu_bn + (1-a) mu_in,  r = 1 / sqrt(a var_bn + (1-a) var_in + eps)
    y = gamma (x - mu) r + beta

Training also updates running = (1 - momentum) running + momentum batch with momentum 0.1 (the
reference writes it as 0.9 * running + 0.1 * batch). running_var takes var_bn exactly as it is
used above (no extra Bessel correction), as the reference does.

m = 1: the unbiased instance variance is 0/0 and, as in the reference (torch.var), y is NaN
everywhere (even a = 1 gives 0 * NaN). The kernels follow that; `iics_fast.models.AIBN2d` refuses
such inputs with a ValueError instead.

Forward, three launches: `_aibn_stats_kernel` reads x once and writes mu_in, var_in (float32,
(N, C)) from shifted sums: with k the first element of each (n, c), S1 = sum (x - k) and
S2 = sum (x - k)^2 accumulate per lane in registers (one subtract and one FMA an element, one
cross-lane reduction at the end), then mu_in = k + S1/m, var_in = (S2 - S1^2/m) / (m - 1). The
shift removes the E[x^2] - E[x]^2 cancellation of plain sums when |mean| >> std.
`_aibn_fwd_finalize_kernel` (per channel block, over N in [BLOCK_N, BLOCK_C] tiles) forms mu_bn
and var_bn (as mean(var_in) + mean((mu_in - mu_bn)^2), the same quantity without cancellation),
updates the running statistics, and writes the per-(n, c) mixed mean and gamma * r. `_aibn_apply_kernel`
reads x a second time and writes y once. In eval, when one tile holds all of H*W (H*W <= 2048),
`_aibn_eval_kernel` does it all in one pass (exact two-pass statistics in registers, the running
statistics on the batch side): x read once, y written once. Saved for backward: x and the
(N, C) / (C,) statistics.

Backward, with g = dL/dy, xhat = (x - mu) r, and per (n, c) the sums Sg = sum_i g_i and
Sgx = sum_i g_i xhat_i:

    dbeta  = sum_n Sg                         dgamma = sum_n Sgx
    A = dL/dmu     = -gamma r Sg              B = dL/d(sigma^2) = -gamma r^2 Sgx / 2
    dL/da  = sum_{n,c} A (mu_bn - mu_in) + B (var_bn - var_in);  dalpha = dL/da if 0 <= alpha <= 1
             else 0 (torch.clamp's gradient: passed at the bounds, zero outside).
    Through the instance statistics directly: (1-a) A and (1-a) B. In training mu_bn and var_bn
    depend on every mu_in, var_in:  d mu_bn / d mu_in = 1/N,  d var_bn / d var_in = 1/N,
    d var_bn / d mu_in = 2 (mu_in - mu_bn) / N. With SA = sum_n A, SB = sum_n B:
        G_mu  = (1-a) A + a SA / N + 2 a SB (mu_in - mu_bn) / N        (eval: (1-a) A)
        G_var = (1-a) B + a SB / N                                      (eval: (1-a) B)
    dx_i = gamma r g_i + G_mu / m + 2 G_var (x_i - mu_in) / (m - 1)
         = k1 g_i + k2 (x_i - mu_in) + k3.

`_aibn_bwd_reduce_kernel` reads x and g once for Sg and sum_i g_i (x_i - mu);
`_aibn_bwd_finalize_kernel` forms dgamma, dbeta, per-block partials of dalpha and k1, k2, k3;
`_aibn_bwd_apply_kernel` reads x and g again and writes dx once.

Inputs: float32, float16 or bfloat16 activations (statistics and all arithmetic in float32,
y and dx in the input dtype), channels-first contiguous or channels-last; other layouts are made
contiguous first. `aibn_ref` is the composite-op form the reference code writes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable


# ----------------------------------------------------------------------------------------------
# Reference


def aibn_ref(x, running_mean, running_var, weight, bias, alpha, training=False, momentum=0.1, eps=1e-5,
             batch_sums=None):
    """Eq. 12 as the reference code writes it, in plain PyTorch ops (autograd through them).

    x: (N, C, H, W); running_mean, running_var: (C,) float32 buffers, updated in place in
    training; weight, bias: (C,); alpha: (1,) unclamped mixing weight. Half inputs are computed
    in float32 and the result cast back to x's dtype. batch_sums: optional callable
    (sum_n mu_in, sum_n (var_in + mu_in^2), N) -> the same over a larger batch (differentiable),
    e.g. over every rank of a process group: the batch statistics are then that batch's.
    """
    N, C, H, W = x.shape
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xf = xf.reshape(N, C, H * W)
    mean_in = xf.mean(-1, keepdim=True)
    var_in = xf.var(-1, keepdim=True)  # unbiased over H*W (NaN when H*W == 1)
    if training and batch_sums is not None:
        s1, s2, count = batch_sums(mean_in.sum(0, keepdim=True), (var_in + mean_in**2).sum(0, keepdim=True), N)
        mean_bn = s1 / count
        var_bn = s2 / count - mean_bn**2
    elif training:
        mean_bn = mean_in.mean(0, keepdim=True)
        var_bn = (var_in + mean_in**2).mean(0, keepdim=True) - mean_bn**2
    if training:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * mean_bn.reshape(C).to(running_mean.dtype))
            running_var.mul_(1 - momentum).add_(momentum * var_bn.reshape(C).to(running_var.dtype))
    else:
        mean_bn = running_mean.to(xf.dtype).reshape(1, C, 1)
        var_bn = running_var.to(xf.dtype).reshape(1, C, 1)
    a = torch.clamp(alpha, 0, 1).to(xf.dtype)
    mean = (1 - a) * mean_in + a * mean_bn
    var = (1 - a) * var_in + a * var_bn
    y = (xf - mean) / (var + eps).sqrt()
    y = y.reshape(N, C, H, W) * weight.to(xf.dtype).reshape(1, C, 1, 1) + bias.to(xf.dtype).reshape(1, C, 1, 1)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Kernels. Activations are addressed as (n, c, s) with s = h * W + w: channels-first puts element
# (n, c, s) at n*C*HW + c*HW + s, channels-last at n*HW*C + s*C + c. A program owns one sample n
# and BLOCK_C channels and walks s in tiles of BLOCK_S.


@triton.jit
def _tile_offsets(start, c_offs, C, HW, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr):
    s_offs = start + tl.arange(0, BLOCK_S)
    if CHANNELS_LAST:
        offs = s_offs[None, :] * C + c_offs[:, None]
    else:
        offs = c_offs[:, None] * HW + s_offs[None, :]
    return offs, s_offs < HW


@triton.jit
def _aibn_stats_kernel(
    x_ptr,  # *T   activation (N, C, H, W), channels-first or channels-last
    mu_in_ptr,  # *f32 (N, C) out: instance mean over H*W
    var_in_ptr,  # *f32 (N, C) out: unbiased instance variance over H*W
    C,
    HW,
    inv_dof,  # 1 / (HW - 1), NaN when HW == 1 (as torch.var)
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n = tl.program_id(0)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    base = x_ptr + n.to(tl.int64) * C * HW
    # shift: each (n, c)'s first element, so the sums below are of x - k (no cancellation
    # between E[x^2] and E[x]^2 when |mean| >> std)
    if CHANNELS_LAST:
        k = tl.load(base + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    else:
        k = tl.load(base + c_offs * HW, mask=c_mask, other=0.0).to(tl.float32)
    acc1 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)  # per-lane sums of (x - k)
    acc2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)  # per-lane sums of (x - k)^2
    for start in range(0, HW, BLOCK_S):
        offs, s_mask = _tile_offsets(start, c_offs, C, HW, CHANNELS_LAST, BLOCK_S)
        mask = c_mask[:, None] & s_mask[None, :]
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - k[:, None], 0.0)
        acc1 += d
        acc2 += d * d
    s1 = tl.sum(acc1, axis=1)
    s2 = tl.sum(acc2, axis=1)
    var = tl.maximum(s2 - s1 * s1 / HW, 0.0) * inv_dof
    tl.store(mu_in_ptr + n * C + c_offs, k + s1 / HW, mask=c_mask)
    tl.store(var_in_ptr + n * C + c_offs, var, mask=c_mask)


@triton.jit
def _sample_tile(n0, rows, c_offs, c_mask, N, C):
    """(BLOCK_N, BLOCK_C) offsets into an (N, C) statistics array for samples n0 + rows, and
    their mask (the finalize kernels walk the samples in such tiles)."""
    nc = (n0 + rows)[:, None] * C + c_offs[None, :]
    return nc, ((n0 + rows) < N)[:, None] & c_mask[None, :]


@triton.jit
def _aibn_fwd_finalize_kernel(
    mu_in_ptr,  # *f32 (N, C) instance means
    var_in_ptr,  # *f32 (N, C) instance variances (unbiased)
    weight_ptr,  # *Tp  (C,) gamma
    alpha_ptr,  # *Tp  (1,) unclamped alpha
    run_mean_ptr,  # *f32 (C,) running mean: read in eval, updated in place in training
    run_var_ptr,  # *f32 (C,) running var: read in eval, updated in place in training
    mu_bn_ptr,  # *f32 (C,) the batch-side mean used (batch stats or running copy): out, or in with GIVEN_BN
    var_bn_ptr,  # *f32 (C,) the batch-side variance used: out, or in with GIVEN_BN
    mean_ptr,  # *f32 (N, C) out: mixed mean a mu_bn + (1-a) mu_in
    scale_ptr,  # *f32 (N, C) out: gamma / sqrt(mixed var + eps)
    N,
    C,
    momentum,
    eps,
    TRAINING: tl.constexpr,
    GIVEN_BN: tl.constexpr,  # training: batch statistics of a larger batch (all ranks) given
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # one program: BLOCK_C channels; samples in [BLOCK_N, BLOCK_C] tiles (one load round each)
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    rows = tl.arange(0, BLOCK_N)
    a = tl.load(alpha_ptr).to(tl.float32)
    a = tl.minimum(tl.maximum(a, 0.0), 1.0)
    if TRAINING:
        if GIVEN_BN:
            mu_bn = tl.load(mu_bn_ptr + c_offs, mask=c_mask, other=0.0)
            var_bn = tl.load(var_bn_ptr + c_offs, mask=c_mask, other=0.0)
        else:
            acc = tl.zeros([BLOCK_C], tl.float32)
            for n0 in range(0, N, BLOCK_N):
                nc, m = _sample_tile(n0, rows, c_offs, c_mask, N, C)
                acc += tl.sum(tl.load(mu_in_ptr + nc, mask=m, other=0.0), axis=0)
            mu_bn = acc / N
            acc = tl.zeros([BLOCK_C], tl.float32)
            for n0 in range(0, N, BLOCK_N):
                nc, m = _sample_tile(n0, rows, c_offs, c_mask, N, C)
                d = tl.where(m, tl.load(mu_in_ptr + nc, mask=m, other=0.0) - mu_bn[None, :], 0.0)
                acc += tl.sum(tl.load(var_in_ptr + nc, mask=m, other=0.0) + d * d, axis=0)
            var_bn = acc / N
        rm = tl.load(run_mean_ptr + c_offs, mask=c_mask, other=0.0)
        rv = tl.load(run_var_ptr + c_offs, mask=c_mask, other=0.0)
        tl.store(run_mean_ptr + c_offs, (1.0 - momentum) * rm + momentum * mu_bn, mask=c_mask)
        tl.store(run_var_ptr + c_offs, (1.0 - momentum) * rv + momentum * var_bn, mask=c_mask)
    else:
        mu_bn = tl.load(run_mean_ptr + c_offs, mask=c_mask, other=0.0)
        var_bn = tl.load(run_var_ptr + c_offs, mask=c_mask, other=1.0)
    tl.store(mu_bn_ptr + c_offs, mu_bn, mask=c_mask)
    tl.store(var_bn_ptr + c_offs, var_bn, mask=c_mask)
    gamma = tl.load(weight_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    for n0 in range(0, N, BLOCK_N):
        nc, m = _sample_tile(n0, rows, c_offs, c_mask, N, C)
        mu = tl.load(mu_in_ptr + nc, mask=m, other=0.0)
        v = tl.load(var_in_ptr + nc, mask=m, other=0.0)
        r = 1.0 / tl.sqrt(a * var_bn[None, :] + (1.0 - a) * v + eps)
        tl.store(mean_ptr + nc, a * mu_bn[None, :] + (1.0 - a) * mu, mask=m)
        tl.store(scale_ptr + nc, gamma * r, mask=m)


@triton.jit
def _aibn_apply_kernel(
    x_ptr,  # *T   activation in
    y_ptr,  # *T   out, same layout as x
    mean_ptr,  # *f32 (N, C) mixed mean
    scale_ptr,  # *f32 (N, C) gamma * r
    bias_ptr,  # *Tp  (C,) beta
    C,
    HW,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n = tl.program_id(0)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    base = n.to(tl.int64) * C * HW
    mean = tl.load(mean_ptr + n * C + c_offs, mask=c_mask, other=0.0)[:, None]
    scale = tl.load(scale_ptr + n * C + c_offs, mask=c_mask, other=0.0)[:, None]
    beta = tl.load(bias_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)[:, None]
    for start in range(0, HW, BLOCK_S):
        offs, s_mask = _tile_offsets(start, c_offs, C, HW, CHANNELS_LAST, BLOCK_S)
        mask = c_mask[:, None] & s_mask[None, :]
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * scale + beta
        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _aibn_eval_kernel(
    x_ptr,  # *T   activation in; one [BLOCK_C, BLOCK_S] tile covers all of H*W
    y_ptr,  # *T   out, same layout as x
    mu_in_ptr,  # *f32 (N, C) out: instance means (for backward)
    var_in_ptr,  # *f32 (N, C) out: unbiased instance variances (for backward)
    weight_ptr,  # *Tp  (C,) gamma
    bias_ptr,  # *Tp  (C,) beta
    alpha_ptr,  # *Tp  (1,) unclamped alpha
    run_mean_ptr,  # *f32 (C,) running mean
    run_var_ptr,  # *f32 (C,) running var
    C,
    HW,
    inv_dof,  # 1 / (HW - 1), NaN when HW == 1
    eps,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # eval: the batch side is the running statistics, so x is read once (stats exact, two-pass
    # in registers) and y written once
    n = tl.program_id(0)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    base = n.to(tl.int64) * C * HW
    offs, s_mask = _tile_offsets(0, c_offs, C, HW, CHANNELS_LAST, BLOCK_S)
    mask = c_mask[:, None] & s_mask[None, :]
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    mu = tl.sum(x, axis=1) / HW
    d = tl.where(mask, x - mu[:, None], 0.0)
    var = tl.sum(d * d, axis=1) * inv_dof
    a = tl.load(alpha_ptr).to(tl.float32)
    a = tl.minimum(tl.maximum(a, 0.0), 1.0)
    rm = tl.load(run_mean_ptr + c_offs, mask=c_mask, other=0.0)
    rv = tl.load(run_var_ptr + c_offs, mask=c_mask, other=1.0)
    gamma = tl.load(weight_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    beta = tl.load(bias_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    mean = a * rm + (1.0 - a) * mu
    scale = gamma / tl.sqrt(a * rv + (1.0 - a) * var + eps)
    y = (x - mean[:, None]) * scale[:, None] + beta[:, None]
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mu_in_ptr + n * C + c_offs, mu, mask=c_mask)
    tl.store(var_in_ptr + n * C + c_offs, var, mask=c_mask)


@triton.jit
def _aibn_bwd_reduce_kernel(
    x_ptr,  # *T   activation saved from forward
    g_ptr,  # *T   dL/dy, same layout as x
    mu_in_ptr,  # *f32 (N, C) instance means
    mu_bn_ptr,  # *f32 (C,) batch-side mean used in forward
    alpha_ptr,  # *Tp  (1,) unclamped alpha
    sum_g_ptr,  # *f32 (N, C) out: sum_i g_i
    sum_gxc_ptr,  # *f32 (N, C) out: sum_i g_i (x_i - mu), mu the mixed mean
    C,
    HW,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n = tl.program_id(0)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    base = n.to(tl.int64) * C * HW
    a = tl.load(alpha_ptr).to(tl.float32)
    a = tl.minimum(tl.maximum(a, 0.0), 1.0)
    mu_in = tl.load(mu_in_ptr + n * C + c_offs, mask=c_mask, other=0.0)
    mu_bn = tl.load(mu_bn_ptr + c_offs, mask=c_mask, other=0.0)
    mean = (a * mu_bn + (1.0 - a) * mu_in)[:, None]
    acc_g = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_gx = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for start in range(0, HW, BLOCK_S):
        offs, s_mask = _tile_offsets(start, c_offs, C, HW, CHANNELS_LAST, BLOCK_S)
        mask = c_mask[:, None] & s_mask[None, :]
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        acc_g += g
        acc_gx += g * (x - mean)  # g is 0 where masked
    tl.store(sum_g_ptr + n * C + c_offs, tl.sum(acc_g, axis=1), mask=c_mask)
    tl.store(sum_gxc_ptr + n * C + c_offs, tl.sum(acc_gx, axis=1), mask=c_mask)


@triton.jit
def _aibn_bwd_finalize_kernel(
    mu_in_ptr,  # *f32 (N, C) instance means
    var_in_ptr,  # *f32 (N, C) instance variances
    mu_bn_ptr,  # *f32 (C,) batch-side mean used in forward
    var_bn_ptr,  # *f32 (C,) batch-side variance used in forward
    weight_ptr,  # *Tp  (C,) gamma
    alpha_ptr,  # *Tp  (1,) unclamped alpha
    sum_g_ptr,  # *f32 (N, C) sum_i g_i
    sum_gxc_ptr,  # *f32 (N, C) sum_i g_i (x_i - mu)
    dweight_ptr,  # *f32 (C,) out: dL/dgamma
    dbias_ptr,  # *f32 (C,) out: dL/dbeta
    dalpha_part_ptr,  # *f32 (cdiv(C, BLOCK_C),) out: this block's share of dL/dalpha
    k1_ptr,  # *f32 (N, C) out: dx = k1 g + k2 (x - mu_in) + k3
    k2_ptr,  # *f32 (N, C) out
    k3_ptr,  # *f32 (N, C) out
    sum_ab_ptr,  # *f32 (2, C) sums over the batch of dL/dmean and dL/dvar: out in STAGE 1, in in STAGE 2
    N,
    N_batch,  # samples the batch statistics were taken over (N, or all ranks' samples)
    C,
    HW,
    inv_dof,  # 1 / (HW - 1), NaN when HW == 1
    eps,
    TRAINING: tl.constexpr,
    STAGE: tl.constexpr,  # 0: all; 1: the parameter gradients and sum_ab; 2: the k's from a given sum_ab
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    rows = tl.arange(0, BLOCK_N)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    a = tl.minimum(tl.maximum(alpha, 0.0), 1.0)
    gamma = tl.load(weight_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    mu_bn = tl.load(mu_bn_ptr + c_offs, mask=c_mask, other=0.0)[None, :]
    var_bn = tl.load(var_bn_ptr + c_offs, mask=c_mask, other=0.0)[None, :]
    if STAGE == 2:
        sum_a = tl.load(sum_ab_ptr + c_offs, mask=c_mask, other=0.0)
        sum_b = tl.load(sum_ab_ptr + C + c_offs, mask=c_mask, other=0.0)
    else:
        sum_a, sum_b = _bwd_param_grads(mu_in_ptr, var_in_ptr, sum_g_ptr, sum_gxc_ptr, dweight_ptr, dbias_ptr,
                                        dalpha_part_ptr, gamma, mu_bn, var_bn, alpha, a, c_offs, c_mask, rows,
                                        N, C, eps, BLOCK_C, BLOCK_N)
        if STAGE == 1:
            tl.store(sum_ab_ptr + c_offs, sum_a, mask=c_mask)
            tl.store(sum_ab_ptr + C + c_offs, sum_b, mask=c_mask)
    if STAGE != 1:
        _bwd_input_coeffs(mu_in_ptr, var_in_ptr, sum_g_ptr, sum_gxc_ptr, k1_ptr, k2_ptr, k3_ptr, gamma, mu_bn,
                          var_bn, a, sum_a, sum_b, c_offs, c_mask, rows, N, N_batch, C, HW, inv_dof, eps,
                          TRAINING, BLOCK_N)


@triton.jit
def _bwd_param_grads(mu_in_ptr, var_in_ptr, sum_g_ptr, sum_gxc_ptr, dweight_ptr, dbias_ptr, dalpha_part_ptr,
                     gamma, mu_bn, var_bn, alpha, a, c_offs, c_mask, rows, N, C, eps,
                     BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """First pass of the backward finalize: dL/dgamma, dL/dbeta, this block's dL/dalpha; returns
    the per-channel sums over the samples of dL/dmean and dL/dvar (the batch-side terms)."""
    d_gamma = tl.zeros([BLOCK_C], tl.float32)
    d_beta = tl.zeros([BLOCK_C], tl.float32)
    d_a = tl.zeros([BLOCK_C], tl.float32)
    sum_a = tl.zeros([BLOCK_C], tl.float32)
    sum_b = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nc, m = _sample_tile(n0, rows, c_offs, c_mask, N, C)
        mu = tl.load(mu_in_ptr + nc, mask=m, other=0.0)
        v = tl.load(var_in_ptr + nc, mask=m, other=0.0)
        sg = tl.load(sum_g_ptr + nc, mask=m, other=0.0)
        r = 1.0 / tl.sqrt(a * var_bn + (1.0 - a) * v + eps)
        sgx = tl.load(sum_gxc_ptr + nc, mask=m, other=0.0) * r  # sum_i g_i xhat_i
        big_a = -gamma * r * sg  # dL/dmu (0 where masked: sg = sgx = 0)
        big_b = -0.5 * gamma * r * r * sgx  # dL/dsigma^2
        d_beta += tl.sum(sg, axis=0)
        d_gamma += tl.sum(sgx, axis=0)
        sum_a += tl.sum(big_a, axis=0)
        sum_b += tl.sum(big_b, axis=0)
        d_a += tl.sum(big_a * (mu_bn - mu) + big_b * (var_bn - v), axis=0)
    tl.store(dweight_ptr + c_offs, d_gamma, mask=c_mask)
    tl.store(dbias_ptr + c_offs, d_beta, mask=c_mask)
    inside = (alpha >= 0.0) & (alpha <= 1.0)
    tl.store(dalpha_part_ptr + tl.program_id(0), tl.where(inside, tl.sum(d_a, axis=0), 0.0))
    return sum_a, sum_b


@triton.jit
def _bwd_input_coeffs(mu_in_ptr, var_in_ptr, sum_g_ptr, sum_gxc_ptr, k1_ptr, k2_ptr, k3_ptr, gamma, mu_bn,
                      var_bn, a, sum_a, sum_b, c_offs, c_mask, rows, N, N_batch, C, HW, inv_dof, eps,
                      TRAINING: tl.constexpr, BLOCK_N: tl.constexpr):
    """Second pass of the backward finalize: the per-(sample, channel) coefficients of dx; the
    batch-side terms spread sum_a, sum_b over the N_batch samples the statistics came from."""
    for n0 in range(0, N, BLOCK_N):
        nc, m = _sample_tile(n0, rows, c_offs, c_mask, N, C)
        mu = tl.load(mu_in_ptr + nc, mask=m, other=0.0)
        v = tl.load(var_in_ptr + nc, mask=m, other=0.0)
        sg = tl.load(sum_g_ptr + nc, mask=m, other=0.0)
        r = 1.0 / tl.sqrt(a * var_bn + (1.0 - a) * v + eps)
        sgx = tl.load(sum_gxc_ptr + nc, mask=m, other=0.0) * r
        g_mu = (1.0 - a) * (-gamma * r * sg)
        g_var = (1.0 - a) * (-0.5 * gamma * r * r * sgx)
        if TRAINING:
            g_mu += a * (sum_a[None, :] + 2.0 * sum_b[None, :] * (mu - mu_bn)) / N_batch
            g_var += a * sum_b[None, :] / N_batch
        tl.store(k1_ptr + nc, gamma * r, mask=m)
        tl.store(k2_ptr + nc, 2.0 * g_var * inv_dof, mask=m)
        tl.store(k3_ptr + nc, g_mu / HW, mask=m)


@triton.jit
def _aibn_bwd_apply_kernel(
    x_ptr,  # *T   activation saved from forward
    g_ptr,  # *T   dL/dy, same layout as x
    dx_ptr,  # *T   out: dL/dx, same layout as x
    mu_in_ptr,  # *f32 (N, C) instance means
    k1_ptr,  # *f32 (N, C)
    k2_ptr,  # *f32 (N, C)
    k3_ptr,  # *f32 (N, C)
    C,
    HW,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n = tl.program_id(0)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    base = n.to(tl.int64) * C * HW
    nc = n * C + c_offs
    mu_in = tl.load(mu_in_ptr + nc, mask=c_mask, other=0.0)[:, None]
    k1 = tl.load(k1_ptr + nc, mask=c_mask, other=0.0)[:, None]
    k2 = tl.load(k2_ptr + nc, mask=c_mask, other=0.0)[:, None]
    k3 = tl.load(k3_ptr + nc, mask=c_mask, other=0.0)[:, None]
    for start in range(0, HW, BLOCK_S):
        offs, s_mask = _tile_offsets(start, c_offs, C, HW, CHANNELS_LAST, BLOCK_S)
        mask = c_mask[:, None] & s_mask[None, :]
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dx = k1 * g + k2 * (x - mu_in) + k3
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TILE = 2048  # elements per streaming tile: 16 values a thread at 4 warps
FINALIZE_BLOCK_C = 32  # channels a finalize program owns
FINALIZE_BLOCK_N = 64  # samples it loads at once: one load round per pass for N <= 64
EVAL_MAX_HW = TILE  # eval forward in one pass when one tile row holds all of H*W


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(x in a layout the kernels read, channels_last flag)."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def _blocks(C: int, HW: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): the contiguous axis gets the wide side of a TILE-element tile."""
    if channels_last:
        block_c = min(triton.next_power_of_2(C), 256)
        block_s = min(triton.next_power_of_2(HW), max(1, TILE // block_c))
    else:
        block_s = min(triton.next_power_of_2(HW), 1024)
        block_c = min(triton.next_power_of_2(C), max(1, TILE // block_s))
    return block_c, block_s


def _inv_dof(HW: int) -> float:
    """1 / (H*W - 1) for the unbiased variance, a host float (no constant division by zero in a
    kernel specialised for H*W == 1); NaN there, as torch.var gives."""
    return 1.0 / (HW - 1) if HW > 1 else float("nan")


def _eval_blocks(C: int, HW: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of the one-pass eval kernel: BLOCK_S covers H*W."""
    block_s = triton.next_power_of_2(HW)
    return min(triton.next_power_of_2(C), max(1, TILE // block_s)), block_s


def _finalize_block_n(N: int) -> int:
    return min(triton.next_power_of_2(N), FINALIZE_BLOCK_N)


def _check(x, weight, bias, alpha, running_mean, running_var):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"AIBN expects x of shape (N, C, H, W); got {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"AIBN supports float32, float16 and bfloat16 activations; got {x.dtype}: cast x first")
    N, C, H, W = x.shape
    if N == 0 or C == 0 or H * W == 0:
        raise ValueError(f"AIBN needs a non-empty input; got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t.shape != (C,):
            raise ValueError(f"AIBN {name} must have shape ({C},) for {C} channels; got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"AIBN {name} is on {t.device} but x is on {x.device}: move them together")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise TypeError(f"AIBN {name} must be a contiguous float32 buffer; got {t.dtype}")
    if alpha.numel() != 1 or alpha.device != x.device:
        raise ValueError(f"AIBN alpha must be one value on x's device ({x.device}); got shape "
                         f"{tuple(alpha.shape)} on {alpha.device}")


def aibn_forward(x, running_mean, running_var, weight, bias, alpha, training=False, momentum=0.1, eps=1e-5,
                 sum_ranks=None):
    """Fused forward. Returns (y, (mu_in, var_in, mu_bn, var_bn), n_batch); updates the running
    statistics in place when training. y has x's dtype and memory layout. sum_ranks: None, or a
    callable that sums a tensor over the ranks of a process group in place (torch.distributed's
    all_reduce): in training the batch statistics are then those of every rank's samples
    together (n_batch of them)."""
    _check(x, weight, bias, alpha, running_mean, running_var)
    x, channels_last = _layout(x)
    N, C, H, W = x.shape
    HW = H * W
    dev = x.device
    mu_in = torch.empty((N, C), device=dev, dtype=torch.float32)
    var_in = torch.empty_like(mu_in)
    mean = torch.empty_like(mu_in)
    scale = torch.empty_like(mu_in)
    mu_bn = torch.empty((C,), device=dev, dtype=torch.float32)
    var_bn = torch.empty_like(mu_bn)
    y = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    weight, bias, alpha = weight.detach().contiguous(), bias.detach().contiguous(), alpha.detach().reshape(1)
    if not training and HW <= EVAL_MAX_HW:
        block_c, block_s = _eval_blocks(C, HW)
        _aibn_eval_kernel[(N, triton.cdiv(C, block_c))](
            x, y, mu_in, var_in, weight, bias, alpha, running_mean, running_var, C, HW, _inv_dof(HW), float(eps),
            channels_last, block_c, block_s,
        )
        mu_bn.copy_(running_mean)
        var_bn.copy_(running_var)
        return y, (mu_in, var_in, mu_bn, var_bn), N
    block_c, block_s = _blocks(C, HW, channels_last)
    grid = (N, triton.cdiv(C, block_c))
    _aibn_stats_kernel[grid](x, mu_in, var_in, C, HW, _inv_dof(HW), channels_last, block_c, block_s)
    given, n_batch = training and sum_ranks is not None, N
    if given:
        # (sum mu_in, sum var_in + mu_in^2, N) over all ranks, in float64: no cancellation in
        # var_bn = E[var_in + mu_in^2] - mu_bn^2
        m64 = mu_in.double()
        sums = torch.cat([m64.sum(0), (var_in.double() + m64 * m64).sum(0),
                          torch.full((1,), float(N), dtype=torch.float64, device=dev)])
        sum_ranks(sums)
        n_batch = int(round(float(sums[-1])))
        mu64 = sums[:C] / n_batch
        mu_bn.copy_(mu64)
        var_bn.copy_(sums[C:2 * C] / n_batch - mu64 * mu64)
    _aibn_fwd_finalize_kernel[(triton.cdiv(C, FINALIZE_BLOCK_C),)](
        mu_in, var_in, weight, alpha, running_mean, running_var, mu_bn, var_bn, mean, scale,
        N, C, float(momentum), float(eps), bool(training), given, _finalize_block_n(N), FINALIZE_BLOCK_C,
    )
    _aibn_apply_kernel[grid](x, y, mean, scale, bias, C, HW, channels_last, block_c, block_s)
    return y, (mu_in, var_in, mu_bn, var_bn), n_batch


def aibn_backward(g, x, weight, alpha, stats, training=False, eps=1e-5, need_dx=True, sum_ranks=None,
                  n_batch=None):
    """Fused backward from the forward's saved statistics. Returns (dx, dweight, dbias, dalpha);
    dx is None when need_dx is False. With the forward's sum_ranks and n_batch, the batch-side
    terms of dx are summed over the ranks (each rank's parameter gradients stay its own part)."""
    mu_in, var_in, mu_bn, var_bn = stats
    x, channels_last = _layout(x)
    g = g.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    N, C, H, W = x.shape
    HW = H * W
    dev = x.device
    weight, alpha = weight.detach().contiguous(), alpha.detach().reshape(1)
    block_c, block_s = _blocks(C, HW, channels_last)
    grid = (N, triton.cdiv(C, block_c))
    sum_g = torch.empty((N, C), device=dev, dtype=torch.float32)
    sum_gxc = torch.empty_like(sum_g)
    _aibn_bwd_reduce_kernel[grid](x, g, mu_in, mu_bn, alpha, sum_g, sum_gxc, C, HW, channels_last, block_c, block_s)
    n_fin = triton.cdiv(C, FINALIZE_BLOCK_C)
    dweight = torch.empty((C,), device=dev, dtype=torch.float32)
    dbias = torch.empty_like(dweight)
    dalpha_part = torch.empty((n_fin,), device=dev, dtype=torch.float32)
    k1, k2, k3 = torch.empty_like(sum_g), torch.empty_like(sum_g), torch.empty_like(sum_g)
    sum_ab = torch.empty((2, C), device=dev, dtype=torch.float32)
    split = bool(training) and sum_ranks is not None

    def finalize(stage):
        _aibn_bwd_finalize_kernel[(n_fin,)](
            mu_in, var_in, mu_bn, var_bn, weight, alpha, sum_g, sum_gxc, dweight, dbias, dalpha_part,
            k1, k2, k3, sum_ab, N, n_batch if split else N, C, HW, _inv_dof(HW), float(eps), bool(training),
            stage, _finalize_block_n(N), FINALIZE_BLOCK_C,
        )

    if split:  # the batch-side sums over every rank's samples between the two passes
        finalize(1)
        sum_ranks(sum_ab)
        finalize(2)
    else:
        finalize(0)
    dx = None
    if need_dx:
        dx = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        _aibn_bwd_apply_kernel[grid](x, g, dx, mu_in, k1, k2, k3, C, HW, channels_last, block_c, block_s)
    return dx, dweight.to(weight.dtype), dbias.to(weight.dtype), dalpha_part.sum().reshape(1).to(alpha.dtype)


class AIBNFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; gradients for x, weight, bias and alpha."""

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, running_mean, running_var, training, momentum, eps, sum_ranks):
        y, stats, n_batch = aibn_forward(x, running_mean, running_var, weight, bias, alpha, training, momentum,
                                         eps, sum_ranks)
        ctx.save_for_backward(x, weight, alpha, *stats)
        ctx.training, ctx.eps, ctx.alpha_shape = bool(training), float(eps), alpha.shape
        ctx.sum_ranks, ctx.n_batch = sum_ranks, n_batch
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, weight, alpha, *stats = ctx.saved_tensors
        dx, dw, db, da = aibn_backward(g, x, weight, alpha, stats, ctx.training, ctx.eps, ctx.needs_input_grad[0],
                                       ctx.sum_ranks, ctx.n_batch)
        return dx, dw, db, da.reshape(ctx.alpha_shape), None, None, None, None, None, None


def aibn(x, running_mean, running_var, weight, bias, alpha, training=False, momentum=0.1, eps=1e-5,
         sum_ranks=None):
    """Eq. 12 with the fused kernels (same arguments and result as `aibn_ref`; sum_ranks as in
    `aibn_forward`: the batch statistics of every rank's samples, the ranks' backward passes
    summing their batch-side terms the same way)."""
    return AIBNFunction.apply(x, weight, bias, alpha, running_mean, running_var, training, momentum, eps,
                              sum_ranks)
