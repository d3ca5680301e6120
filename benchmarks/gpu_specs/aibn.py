"""Static compile specs and H100 work models of the AIBN kernels (iics_fast.kernels.aibn), read by
benchmarks/gpu_report.py: the launchers' blocks at ResNet-50 layer3 shapes, and the bytes each
launch moves."""
from __future__ import annotations

from benchmarks.gpu_report import KernelSpec
from iics_fast.kernels.aibn import (FINALIZE_BLOCK_C, FINALIZE_BLOCK_N, _aibn_apply_kernel,
                                    _aibn_bwd_apply_kernel, _aibn_bwd_finalize_kernel,
                                    _aibn_bwd_reduce_kernel, _aibn_eval_kernel,
                                    _aibn_fwd_finalize_kernel, _aibn_stats_kernel, _blocks,
                                    _eval_blocks)


# ----------------------------------------------------------------------------------------------
# Memory traffic of the fused path (bytes read + written per launch, no cache reuse assumed)


def traffic_bytes(N: int, C: int, HW: int, itemsize: int, training: bool = True) -> dict:
    """Bytes each fused kernel moves for an (N, C, H*W) activation of `itemsize`-byte elements.

    Full passes over the activation dominate: forward 3 (stats reads x; apply reads x, writes y),
    or 2 in eval when one tile holds H*W ("eval"), backward 5 (reduce reads x, g; apply reads x,
    g, writes dx). The float32 (N, C) statistics add
    4/HW bytes an element per access (0.03 at layer3's H*W = 128); C-sized terms are included.
    """
    act, nc, c = N * C * HW * itemsize, N * C * 4, C * 4
    finalize_reads = 5 if training else 2
    return {
        "stats": act + N * C * itemsize + 2 * nc,
        "fwd_finalize": (finalize_reads + 2) * nc + (6 if training else 4) * c,
        "apply": 2 * act + 2 * nc + c,
        "bwd_reduce": 2 * act + 3 * nc + c,
        "bwd_finalize": 11 * nc + 7 * c,
        "bwd_apply": 3 * act + 4 * nc,
        "eval": 2 * act + 2 * nc + 6 * c,
    }


def _work_model(kernel: str, spec_constexprs: dict, num_warps: int, C: int = 1024, HW: int = 128):
    """WORK_MODELS entry (see benchmarks.gpu_report): layer3 activation at the scale's batch."""
    itemsize = 2 if ("bf16" in kernel or "fp16" in kernel) else 4
    key = next(k for k in ("fwd_finalize", "bwd_finalize", "bwd_reduce", "bwd_apply", "stats", "apply", "eval")
               if f"aibn_{k}" in kernel)
    training = not (kernel.endswith("_eval") or key == "eval")

    def model(scale: dict) -> dict:
        n = scale["batch"]
        streaming = "finalize" not in key
        rows = spec_constexprs["BLOCK_S"] if streaming else spec_constexprs["BLOCK_N"]
        return {"elements": n * C * (HW if streaming else 1),
                "elements_per_iteration": spec_constexprs["BLOCK_C"] * rows / num_warps,
                "bytes": traffic_bytes(n, C, HW, itemsize, training)[key],
                "note": f"AIBN at ResNet-50 layer3 ({n}, {C}, 16, 8)"}

    return model


# ----------------------------------------------------------------------------------------------
# Static compile report: layer3-like shapes (N = 64, C = 1024, H*W = 16 * 8 = 128) with the
# blocks the launchers pick and the alignment Triton's launcher sees there (16-byte aligned
# tensors; N, C and H*W multiples of 16).


def _spec(name, fn, signature, constexprs) -> KernelSpec:
    attrs = {k: [["tt.divisibility", 16]] for k, v in signature.items() if v.startswith("*") or v == "i32"}
    return KernelSpec(name, fn, signature, constexprs, attrs=attrs)


def _compile_specs() -> list[KernelSpec]:
    specs = []
    C, HW = 1024, 128
    for tname, t in (("fp32", "*fp32"), ("bf16", "*bf16"), ("fp16", "*fp16")):
        for cl in (False, True):
            bc, bs = _blocks(C, HW, cl)
            lay = "cl" if cl else "cf"
            stream = {"CHANNELS_LAST": cl, "BLOCK_C": bc, "BLOCK_S": bs}
            specs += [
                _spec(f"aibn_stats_{tname}_{lay}", _aibn_stats_kernel,
                           {"x_ptr": t, "mu_in_ptr": "*fp32", "var_in_ptr": "*fp32", "C": "i32", "HW": "i32",
                            "inv_dof": "fp32"}, stream),
                _spec(f"aibn_apply_{tname}_{lay}", _aibn_apply_kernel,
                           {"x_ptr": t, "y_ptr": t, "mean_ptr": "*fp32", "scale_ptr": "*fp32", "bias_ptr": "*fp32",
                            "C": "i32", "HW": "i32"}, stream),
                _spec(f"aibn_bwd_reduce_{tname}_{lay}", _aibn_bwd_reduce_kernel,
                           {"x_ptr": t, "g_ptr": t, "mu_in_ptr": "*fp32", "mu_bn_ptr": "*fp32", "alpha_ptr": "*fp32",
                            "sum_g_ptr": "*fp32", "sum_gxc_ptr": "*fp32", "C": "i32", "HW": "i32"}, stream),
                _spec(f"aibn_bwd_apply_{tname}_{lay}", _aibn_bwd_apply_kernel,
                           {"x_ptr": t, "g_ptr": t, "dx_ptr": t, "mu_in_ptr": "*fp32", "k1_ptr": "*fp32",
                            "k2_ptr": "*fp32", "k3_ptr": "*fp32", "C": "i32", "HW": "i32"}, stream),
            ]
    for tname, t, cl in (("fp32", "*fp32", False), ("bf16", "*bf16", True), ("fp16", "*fp16", True)):
        bc, bs = _eval_blocks(C, HW)
        specs.append(_spec(f"aibn_eval_{tname}_{'cl' if cl else 'cf'}", _aibn_eval_kernel,
                           {"x_ptr": t, "y_ptr": t, "mu_in_ptr": "*fp32", "var_in_ptr": "*fp32", "weight_ptr": "*fp32",
                            "bias_ptr": "*fp32", "alpha_ptr": "*fp32", "run_mean_ptr": "*fp32", "run_var_ptr": "*fp32",
                            "C": "i32", "HW": "i32", "inv_dof": "fp32", "eps": "fp32"},
                           {"CHANNELS_LAST": cl, "BLOCK_C": bc, "BLOCK_S": bs}))
    fwd_sig = {"mu_in_ptr": "*fp32", "var_in_ptr": "*fp32", "weight_ptr": "*fp32", "alpha_ptr": "*fp32",
               "run_mean_ptr": "*fp32", "run_var_ptr": "*fp32", "mu_bn_ptr": "*fp32", "var_bn_ptr": "*fp32",
               "mean_ptr": "*fp32", "scale_ptr": "*fp32", "N": "i32", "C": "i32", "momentum": "fp32", "eps": "fp32"}
    bwd_sig = {"mu_in_ptr": "*fp32", "var_in_ptr": "*fp32", "mu_bn_ptr": "*fp32", "var_bn_ptr": "*fp32",
               "weight_ptr": "*fp32", "alpha_ptr": "*fp32", "sum_g_ptr": "*fp32", "sum_gxc_ptr": "*fp32",
               "dweight_ptr": "*fp32", "dbias_ptr": "*fp32", "dalpha_part_ptr": "*fp32", "k1_ptr": "*fp32",
               "k2_ptr": "*fp32", "k3_ptr": "*fp32", "sum_ab_ptr": "*fp32", "N": "i32", "N_batch": "i32",
               "C": "i32", "HW": "i32", "inv_dof": "fp32", "eps": "fp32"}
    blocks = {"BLOCK_N": FINALIZE_BLOCK_N, "BLOCK_C": FINALIZE_BLOCK_C}
    # (name suffix, TRAINING, GIVEN_BN / STAGE): one process, then the ranks-synchronised variants
    for suffix, training, given in (("train", True, False), ("eval", False, False), ("train_synced", True, True)):
        specs.append(_spec(f"aibn_fwd_finalize_{suffix}", _aibn_fwd_finalize_kernel, fwd_sig,
                           {"TRAINING": training, "GIVEN_BN": given, **blocks}))
    for suffix, training, stage in (("train", True, 0), ("eval", False, 0), ("train_synced_stage1", True, 1),
                                    ("train_synced_stage2", True, 2)):
        specs.append(_spec(f"aibn_bwd_finalize_{suffix}", _aibn_bwd_finalize_kernel, bwd_sig,
                           {"TRAINING": training, "STAGE": stage, **blocks}))
    return specs


COMPILE_SPECS: list[KernelSpec] = _compile_specs()
#: H100 estimate inputs per spec (the WORK_MODELS contract of benchmarks.gpu_report)
#: (the one-pass eval kernel has no loop, so no per-iteration figure, and the ranks-synchronised
#: finalize variants split one launch's work: those are reported, not modelled)
WORK_MODELS = {s.name: _work_model(s.name, s.constexprs, s.num_warps) for s in COMPILE_SPECS
               if "aibn_eval" not in s.name and "synced" not in s.name}
