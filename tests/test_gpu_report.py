"""The static GPU report itself: a known kernel compiles for sm_80/sm_90 and its loop is found."""
import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from benchmarks.gpu_report import KernelSpec, compile_report, innermost_loop, parse_sass  # noqa: E402


@triton.jit
def _row_sum(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@pytest.mark.parametrize("arch", [80, 90])
def test_compile_report_reads_registers_and_loop(arch):
    spec = KernelSpec("row_sum", _row_sum, {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_cols": "i32"}, {"BLOCK": 256})
    r = compile_report(spec, arch)
    assert 0 < r.registers <= 255
    assert r.spill_bytes == 0
    assert r.inner_loop_len > 0
    assert "LDG" in r.inner_loop and "FADD" in r.inner_loop


def test_innermost_loop_picks_shortest_backward_branch():
    sass = """
        /*0000*/ MOV R1, R2 ;
        /*0010*/ FADD R3, R3, R4 ;
        /*0020*/ FFMA R3, R3, R4, R5 ;
        /*0030*/ @P0 BRA 0x10 ;
        /*0040*/ @!P1 BRA 0x0 ;
        /*0050*/ EXIT ;
    """
    loop = innermost_loop(parse_sass(sass))
    assert [op for _, op, _ in loop] == ["FADD", "FFMA", "BRA"]


def _report(loop_len, name="k"):
    from benchmarks.gpu_report import CompileReport

    return CompileReport(name=name, arch=90, registers=32, spill_bytes=0, stack_bytes=0, shared_bytes=0,
                         num_warps=4, inner_loop={"FADD": loop_len}, inner_loop_len=loop_len)


def test_estimate_takes_the_larger_of_issue_and_memory_bound():
    from benchmarks.gpu_report import H100, estimate_time

    r = _report(10)
    # 1e12 elements, 40 per warp-iteration -> 0.25 instr/element -> 2.5e11 warp-instructions
    e = estimate_time(r, {"elements": 1e12, "elements_per_iteration": 40, "bytes": 1e9}, "x")
    assert e.instr_per_element == pytest.approx(0.25)
    assert e.issue_s == pytest.approx(2.5e11 / (132 * 4 * 1.755e9))
    assert e.memory_s == pytest.approx(1e9 / 3.35e12)
    assert e.bound == "issue" and e.estimate_s == e.issue_s
    e = estimate_time(r, {"elements": 1e6, "elements_per_iteration": 40, "bytes": 1e12}, "x")
    assert e.bound == "memory" and e.estimate_s == pytest.approx(1e12 / H100.hbm_bytes_per_s)


def test_estimate_rejects_incomplete_work_model():
    from benchmarks.gpu_report import estimate_time

    with pytest.raises(ValueError, match="lacks"):
        estimate_time(_report(4), {"elements": 1})
    with pytest.raises(ValueError, match="no inner loop"):
        estimate_time(_report(0), {"elements": 1, "elements_per_iteration": 1, "bytes": 1})


def test_estimates_from_a_compiled_kernel_and_its_work_model():
    from benchmarks.gpu_report import DATASET_SCALES, estimates

    spec = KernelSpec("row_sum", _row_sum, {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_cols": "i32"}, {"BLOCK": 256})
    r = compile_report(spec, 90)

    def model(scale):  # one row of D scores per image, BLOCK columns per program trip over 4 warps
        n, d = scale["N"], scale["D"]
        return {"elements": n * d, "elements_per_iteration": 256 / 4, "bytes": 4 * n * d + 4 * n}

    est = estimates([r], {"row_sum": model})
    assert [e.scale for e in est] == [s["name"] for s in DATASET_SCALES]
    msmt = est[-1]
    assert msmt.bound == "memory"  # a row sum is bandwidth-bound
    assert msmt.estimate_s == pytest.approx(4 * 32621 * 9001 / 3.35e12)
    assert msmt.instr_per_element == pytest.approx(r.inner_loop_len / 64)


def test_work_model_of_the_fused_distance_kernel():
    pytest.importorskip("iics_fast.kernels.pairwise")
    from benchmarks.gpu_report import DATASET_SCALES, all_specs, all_work_models

    specs = {s.name: s for s in all_specs()}
    models = all_work_models()
    assert "inter_camera_eq5_fp32" in models
    spec = specs["inter_camera_eq5_fp32"]
    msmt = DATASET_SCALES[-1]
    w = models["inter_camera_eq5_fp32"](msmt)
    n = msmt["N"]
    assert w["elements"] == pytest.approx(n * n / 2 * (14 / 15) * 9000)
    b, u = spec.constexprs["BLOCK"], spec.constexprs["UNROLL"]
    assert w["elements_per_iteration"] == b * b * 4 * u / spec.num_warps
    assert w["bytes"] > n * (n - 1) / 2 * 4  # at least the condensed output
