"""Static GPU report: compile Triton kernels for NVIDIA targets without a GPU and read the cubin.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` produces PTX and a cubin on any
machine; Triton's bundled `cuobjdump` then gives registers, spills (local memory) and shared
memory, and the SASS, from which the instruction mix of the innermost loop is counted.

    python -m benchmarks.gpu_report            # every kernel of iics_fast.kernels, sm_80 and sm_90
    python -m benchmarks.gpu_report --estimate # plus H100 time estimates at the dataset scales
    python -m benchmarks.gpu_report --arch 90 --estimate --only inter_camera   # one kernel family

(run from the repository root). The kernels' compile specs and work models are in
benchmarks/gpu_specs/<kernel>.py.

H100 estimates. From the sm_90 compile, the estimate of a kernel at a dataset scale is the larger
of an issue-bound time (inner-loop SASS instructions per element against the H100's issue rate:
132 SMs x 4 schedulers x 1 warp-instruction per cycle at ~1.755 GHz boost) and a memory-bound
time (bytes moved at ~3.35 TB/s HBM3). It counts the innermost loop only, so it is a lower bound
for kernels whose work is outside that loop, and an upper bound on issue for tensor-core loops
(one HMMA covers many elements: say so through ``elements_per_iteration``).

Work-model contract. A spec module may define, beside ``COMPILE_SPECS``,

    WORK_MODELS: dict[str, Callable[[dict], dict]]     # KernelSpec.name -> model

The model takes a scale ``{"name", "N", "C", "D", "d", "batch"}`` (images, cameras, score dims
C x 600, feature dims 2048, training batch) and returns a dict with

    elements                total inner-loop work items at that scale (e.g. pair x dimension
                            terms of a distance kernel: N(N-1)/2 x D)
    elements_per_iteration  work items ONE WARP covers in one trip of the innermost loop, for
                            this spec's constexprs and num_warps (e.g. BLOCK_M*BLOCK_N*BLOCK_D/num_warps)
    bytes                   bytes read from and written to HBM (with the kernel's real reuse)
    note                    optional: what the model assumes

Specs without a model are compiled and reported but get no estimate.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

#: spec modules that expose COMPILE_SPECS (a list of KernelSpec), one a kernel module
KERNEL_MODULES = ("benchmarks.gpu_specs.pairwise", "benchmarks.gpu_specs.aibn")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class KernelSpec:
    """One concrete compilation of a @triton.jit function: argument types and constexpr values."""

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    #: argument name -> [[attribute, value]], e.g. {"x_ptr": [["tt.divisibility", 16]]}: the
    #: alignment facts Triton's launcher derives at run time (16-byte pointers, ints % 16 == 0)
    attrs: dict = field(default_factory=dict)


@dataclass
class CompileReport:
    name: str
    arch: int
    registers: int
    spill_bytes: int  # local memory per thread (register spills); must be 0
    stack_bytes: int
    shared_bytes: int
    num_warps: int
    inner_loop: dict = field(default_factory=dict)  # opcode -> count in the innermost loop
    inner_loop_len: int = 0


def _bin_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) for each instruction of a `cuobjdump -sass` listing."""
    return [(int(a, 16), op, rest.strip()) for a, op, rest in _SASS_LINE.findall(sass)]


def innermost_loop(instrs: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Instructions of the shortest backward-branch range (the innermost loop), or []."""
    best = None
    for addr, op, rest in instrs:
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", rest)
        if m is None:
            continue
        target = int(m.group(1), 16)
        if target < addr and (best is None or addr - target < best[1] - best[0]):
            best = (target, addr)
    if best is None:
        return []
    return [i for i in instrs if best[0] <= i[0] <= best[1]]


def _kernel_in_this_process(module_name: str, path: str, fn_name: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return getattr(module, fn_name)


def _compile_here(module_name, path, fn_name, signature, constexprs, arch, num_warps, num_stages, attrs=None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_in_this_process(module_name, path, fn_name)
    attrs = {(fn.arg_names.index(k),): v for k, v in (attrs or {}).items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(_bin_dir(), "cuobjdump")
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return {"res_usage": res, "sass": sass, "shared": int(kernel.metadata.shared)}


def compile_report(spec: KernelSpec, arch: int) -> CompileReport:
    """Compile `spec` for sm_<arch> and report its resources and inner-loop instruction mix.

    Compilation runs in a child process with Triton's interpreter off: under TRITON_INTERPRET=1
    (as in the tests) @triton.jit yields objects that cannot be compiled.
    """
    fn = getattr(spec.fn, "fn", spec.fn)  # JITFunction and the interpreter's wrapper both keep .fn
    job = {
        "module_name": fn.__module__,
        "path": fn.__code__.co_filename,
        "fn_name": fn.__name__,
        "signature": spec.signature,
        "constexprs": spec.constexprs,
        "arch": arch,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "attrs": spec.attrs,
    }
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_report", "--compile-job"],
        input=json.dumps(job), capture_output=True, text=True, env=env, cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {spec.name} for sm_{arch} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    res = out["res_usage"]

    def field_of(key):
        m = re.search(rf"\b{key}:(\d+)", res)
        return int(m.group(1)) if m else 0

    loop = innermost_loop(parse_sass(out["sass"]))
    mix = collections.Counter(op.split(".")[0] for _, op, _ in loop)
    return CompileReport(
        name=spec.name,
        arch=arch,
        registers=field_of("REG"),
        spill_bytes=field_of("LOCAL"),
        stack_bytes=field_of("STACK"),
        shared_bytes=max(field_of("SHARED"), out["shared"]),
        num_warps=spec.num_warps,
        inner_loop=dict(mix.most_common()),
        inner_loop_len=len(loop),
    )


def _kernel_modules():
    """The modules of KERNEL_MODULES that are present (a missing one is skipped, a broken one raises)."""
    for name in KERNEL_MODULES:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def all_specs() -> list[KernelSpec]:
    """COMPILE_SPECS of every spec module that is present."""
    return [spec for module in _kernel_modules() for spec in module.COMPILE_SPECS]


#: the dataset scales estimates are made at (D = C x 600 score dims, d = 2048 feature dims)
DATASET_SCALES = (
    {"name": "market1501", "N": 12936, "C": 6, "D": 3600, "d": 2048, "batch": 64},
    {"name": "dukemtmc", "N": 16522, "C": 8, "D": 4800, "d": 2048, "batch": 64},
    {"name": "msmt17", "N": 32621, "C": 15, "D": 9000, "d": 2048, "batch": 64},
)


@dataclass(frozen=True)
class Device:
    name: str
    sms: int
    schedulers_per_sm: int  # warp-instructions issued per SM per cycle
    clock_hz: float
    hbm_bytes_per_s: float

    @property
    def issue_per_s(self) -> float:
        return self.sms * self.schedulers_per_sm * self.clock_hz


H100 = Device("H100 SXM", sms=132, schedulers_per_sm=4, clock_hz=1.755e9, hbm_bytes_per_s=3.35e12)


@dataclass
class Estimate:
    kernel: str
    scale: str
    instr_per_element: float  # SASS warp-instructions of the inner loop per work item
    issue_s: float
    memory_s: float
    estimate_s: float  # max(issue_s, memory_s)
    bound: str  # "issue" or "memory"
    elements: float
    bytes: float
    note: str = ""


def estimate_time(report: CompileReport, work: dict, scale_name: str = "", device: Device = H100) -> Estimate:
    """H100 time of one kernel launch at one scale: max(issue-bound, memory-bound)."""
    missing = {"elements", "elements_per_iteration", "bytes"} - set(work)
    if missing:
        raise ValueError(f"work model for {report.name} lacks {sorted(missing)}; see the WORK_MODELS contract "
                         "in the benchmarks.gpu_report docstring")
    if report.inner_loop_len <= 0:
        raise ValueError(f"{report.name}: no inner loop found in the SASS, so no instructions per element")
    per_iter = float(work["elements_per_iteration"])
    if per_iter <= 0:
        raise ValueError(f"{report.name}: elements_per_iteration must be > 0, got {per_iter}")
    ipe = report.inner_loop_len / per_iter
    issue = float(work["elements"]) * ipe / device.issue_per_s
    memory = float(work["bytes"]) / device.hbm_bytes_per_s
    return Estimate(report.name, scale_name, ipe, issue, memory, max(issue, memory),
                    "issue" if issue >= memory else "memory", float(work["elements"]), float(work["bytes"]),
                    work.get("note", ""))


def all_work_models() -> dict:
    """Kernel name -> work model, from the WORK_MODELS of every kernel module that is present."""
    return {name: model for module in _kernel_modules() for name, model in getattr(module, "WORK_MODELS", {}).items()}


def estimates(reports, models=None, scales=DATASET_SCALES, device: Device = H100) -> list[Estimate]:
    """Estimates for every report compiled for sm_90 whose kernel has a work model."""
    models = all_work_models() if models is None else models
    return [estimate_time(r, models[r.name](scale), scale["name"], device)
            for r in reports if r.arch == 90 and r.name in models for scale in scales]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--json", help="also write the reports to this JSON file")
    parser.add_argument("--estimate", action="store_true", help="H100 time estimates at the dataset scales")
    parser.add_argument("--only", help="report only kernels whose name contains this text")
    parser.add_argument("--compile-job", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_job:  # child of compile_report: one job as JSON on stdin, result on stdout
        print(json.dumps(_compile_here(**json.loads(sys.stdin.read()))))
        return None
    specs = [s for s in all_specs() if args.only is None or args.only in s.name]
    reports = [compile_report(s, a) for s in specs for a in args.arch]
    print(f"{'kernel':40s} {'sm':>3s} {'regs':>5s} {'spill':>6s} {'smem':>7s}  inner loop")
    for r in reports:
        mix = " ".join(f"{k}:{v}" for k, v in list(r.inner_loop.items())[:8])
        print(f"{r.name:40s} {r.arch:3d} {r.registers:5d} {r.spill_bytes:6d} {r.shared_bytes:7d}  {mix}")
    est = []
    if args.estimate:
        if 90 not in args.arch:
            reports += [compile_report(s, 90) for s in specs]
        est = estimates(reports)
        print(f"\nH100 estimates ({H100.sms} SMs x {H100.schedulers_per_sm} issue/cycle at {H100.clock_hz / 1e9:.3f} GHz,"
              f" {H100.hbm_bytes_per_s / 1e12:.2f} TB/s HBM3)")
        print(f"{'kernel':40s} {'scale':>11s} {'instr/elem':>10s} {'issue us':>10s} {'memory us':>10s} {'estimate us':>11s}  bound")
        for e in est:
            print(f"{e.kernel:40s} {e.scale:>11s} {e.instr_per_element:10.4f} {e.issue_s * 1e6:10.4g} {e.memory_s * 1e6:10.4g}"
                  f" {e.estimate_s * 1e6:11.4g}  {e.bound}")
        unmodelled = sorted({r.name for r in reports if r.arch == 90} - {e.kernel for e in est})
        if unmodelled:
            print("no work model (no estimate): " + ", ".join(unmodelled))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reports": [asdict(r) for r in reports], "estimates": [asdict(e) for e in est]}, f, indent=1)
    return reports


if __name__ == "__main__":
    main()
