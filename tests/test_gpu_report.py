"""The static GPU report itself: a known kernel compiles for sm_80/sm_90 and its loop is found."""
import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from iics_fast.gpu_report import KernelSpec, compile_report, innermost_loop, parse_sass  # noqa: E402


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
