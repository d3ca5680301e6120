"""Static compile specs and H100 work model of the pairwise kernels (iics_fast.kernels.pairwise),
read by benchmarks/gpu_report.py: the launchers' configurations, and the work of the fused Eq. 5
kernel's innermost loop."""
from __future__ import annotations

from benchmarks.gpu_report import KernelSpec
from iics_fast.kernels.pairwise import (DIST_BK, DIST_BLOCK, JACCARD_BLOCK, MODES, NUM_STAGES,
                                        NUM_WARPS, UNROLL, _inter_camera_kernel,
                                        _pairwise_jaccard_kernel)


# ----------------------------------------------------------------------------- compile specs


def _specs():
    specs = []
    for tag, dt in (("fp32", "*fp32"), ("fp16", "*fp16")):
        bm, bn = JACCARD_BLOCK
        specs.append(KernelSpec(
            f"pairwise_jaccard_{tag}", _pairwise_jaccard_kernel,
            {"at_ptr": dt, "bt_ptr": dt, "sa_ptr": "*fp32", "sb_ptr": "*fp32", "out_ptr": "*fp32",
             "M": "i32", "P": "i32", "M_pad": "i32", "P_pad": "i32", "D_pad": "i32"},
            {"BM": bm, "BN": bn, "UNROLL": UNROLL}, NUM_WARPS, NUM_STAGES,
        ))
        # eq5 for both dtypes (its innermost loop is the L1 loop); "feature" is the one mode
        # whose innermost loop is the cosine (tl.dot); "jaccard" compiles the same L1 loop
        for mode in ("eq5",) if tag == "fp16" else ("eq5", "feature"):
            specs.append(KernelSpec(
                f"inter_camera_{mode}_{tag}", _inter_camera_kernel,
                {"feat_ptr": dt, "st_ptr": dt, "rowsum_ptr": "*fp32", "cam_ptr": "*i32",
                 "perm_ptr": "*i32", "tiles_ptr": "*i32", "out_ptr": "*fp32",
                 "N": "i32", "N_pad": "i32", "d_pad": "i32", "D_pad": "i32", "mu": "fp32",
                 "r0": "i32", "r1": "i32"},
                {"MODE": MODES[mode], "SQUARE": False, "BLOCK": DIST_BLOCK, "BK": DIST_BK,
                 "UNROLL": UNROLL, "DOT_PRECISION": "ieee" if tag == "fp32" else "tf32"},
                NUM_WARPS, NUM_STAGES,
            ))
    return specs


COMPILE_SPECS = _specs()


def _l1_work_model(spec):
    """Work of the fused Eq. 5 kernel's innermost loop, the L1 sweep over the score dimensions:
    every cross-camera pair of the upper triangle (equal-size cameras; same-camera tiles are
    skipped) x D elements; one warp-trip covers BLOCK^2 pairs x 4*UNROLL dims / num_warps. HBM
    traffic: both float32 score tiles of every tile pair read once (no L2 reuse assumed) + the
    condensed float32 output written once."""
    block, unroll = spec.constexprs["BLOCK"], spec.constexprs["UNROLL"]

    def model(scale):
        n, c, d = scale["N"], scale["C"], scale["D"]
        tile_pairs = (n / block) ** 2 / 2 * (1 - 1 / c)
        return {"elements": n * n / 2 * (1 - 1 / c) * d,
                "elements_per_iteration": block * block * 4 * unroll / spec.num_warps,
                "bytes": tile_pairs * 2 * block * d * 4 + n * (n - 1) / 2 * 4,
                "note": "L1 loop over cross-camera pairs; the cosine GEMM is not counted"}

    return model


#: H100 estimate inputs (the WORK_MODELS contract of benchmarks.gpu_report). fp32 eq5 only:
#: there the innermost loop is the L1 sweep (2 FADD an element); in the fp16 build and in
#: "feature" mode the innermost loop is the cosine's tensor-core product instead
WORK_MODELS = {s.name: _l1_work_model(s) for s in COMPILE_SPECS if s.name == "inter_camera_eq5_fp32"}
