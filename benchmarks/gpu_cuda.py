"""The extension's CUDA sources without a GPU: registers and spills of every kernel, and the H100
estimate of the CUDA merge.

Compile check. Each csrc/cuda/*.cu is compiled by nvcc for sm_80 and sm_90 with `-Xptxas -v`;
ptxas's per-kernel lines give registers, spill stores/loads, stack and shared memory.

Merge estimate. The merge runs reciprocal-nearest-neighbour passes (csrc/cluster_rnn.h). The host
instantiation of the same passes records the work of each pass (``cluster_rnn_passes``): live
clusters, merges, rescans, and the triangle entries the device kernels read or write, split into
entries across rows (a column of the condensed triangle: one 32-byte memory sector each, no
reuse assumed) and along rows (4 bytes each, coalesced). The model of one pass on the GPU:

    bytes   = 32 * strided + 4 * contiguous + 48 * live     (the O(n) arrays of four kernels)
    seconds = bytes / HBM bandwidth + 2 host round trips + 4 launches + the one-block finish
              (live * 48 bytes at one SM's share of the bandwidth) + the rescan's latency
              floor (a block walks a row in live / 256 trips of one memory latency each)

summed over the passes measured on synthetic data of the dataset's shape: N points in
identities of ~8 images seen by C cameras, unit features with a camera shift, cosine distance
(the merge's work depends on the distances' structure, which this imitates; it is not the IICS
distance of a trained network). Launch and round-trip costs are typical figures, stated below.

    python -m benchmarks.gpu_cuda                 # kernels of csrc/cuda for sm_80 and sm_90
    python -m benchmarks.gpu_cuda --estimate      # plus the merge estimate at MSMT17 scale
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = ROOT / "csrc" / "cuda"

#: one H100 SXM: HBM3 bandwidth and SM count (as the Triton report's device)
H100_BYTES_PER_S = 3.35e12
H100_SMS = 132
#: typical costs on the host side of a pass (assumed, not measured here): a kernel launch and a
#: device-to-host copy of a few counters with a stream synchronisation
LAUNCH_S = 5e-6
ROUND_TRIP_S = 15e-6
LATENCY_S = 0.6e-6  # one dependent trip to HBM (assumed)
RESCAN_THREADS = 256  # threads of a rescan block (csrc/cuda/cluster_cuda.cu kThreads)
SECTOR_BYTES = 32
SLOT_BYTES = 48  # act, nn, dnn, partner, stale, key, size, rows touched per live slot and pass
MSMT17 = {"name": "msmt17", "N": 32621, "ids": 4101, "C": 15}


@dataclass
class CudaKernel:
    source: str
    kernel: str
    arch: int
    registers: int
    spill_bytes: int  # spill stores + spill loads; must be 0
    stack_bytes: int
    shared_bytes: int


def nvcc() -> str | None:
    """The nvcc to use: $CUDA_HOME/bin/nvcc, else the one on PATH; None if there is none."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def sources() -> list[Path]:
    return sorted(CUDA_SOURCES.glob("*.cu"))


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    plain = out.splitlines()
    return plain if len(plain) == len(names) else names


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _short(name: str) -> str:
    """The kernel's own name from a demangled signature (no namespaces, no arguments)."""
    name = name.replace("(anonymous namespace)", "")
    return re.sub(r"\(.*", "", name).split("::")[-1]


def parse_ptxas(text: str, source: str) -> list[CudaKernel]:
    """Per-kernel resources from `nvcc -Xptxas -v` output."""
    kernels, current = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = {"name": m.group(1), "arch": int(m.group(2))}
        elif current is not None and (m := _PROPS.search(line)):
            current.update(stack=int(m.group(1)), spill=int(m.group(2)) + int(m.group(3)))
        elif current is not None and (m := _USED.search(line)):
            kernels.append((current, int(m.group(1)), int(m.group(2) or 0)))
            current = None
    names = _demangle([c["name"] for c, _, _ in kernels])
    return [CudaKernel(source, _short(name), c["arch"], regs,
                       c.get("spill", 0), c.get("stack", 0), smem)
            for name, (c, regs, smem) in zip(names, kernels)]


def compile_source(source: Path, arch: int) -> list[CudaKernel]:
    """Compiles one .cu to a cubin for sm_<arch> and returns its kernels' resources."""
    tool = nvcc()
    if tool is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [tool, "-std=c++17", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v",
             "-I", str(ROOT / "csrc"), "-o", os.path.join(tmp, "k.cubin"), str(source)],
            capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} for sm_{arch}:\n{proc.stderr[-4000:]}")
    kernels = parse_ptxas(proc.stdout + proc.stderr, source.name)
    if not kernels:
        raise RuntimeError(f"no kernel resources in the ptxas output of {source.name}")
    return kernels


def compile_all(archs=(80, 90)) -> list[CudaKernel]:
    return [k for src in sources() for arch in archs for k in compile_source(src, arch)]


# ----------------------------------------------------------------------------- merge estimate


def synthetic_condensed(n: int, ids: int, cameras: int, dim: int = 256, seed: int = 0,
                        device="cpu"):
    """float32 condensed cosine distances (a torch tensor on `device`) of n unit features:
    `ids` identities (a direction each), `cameras` cameras (a shared shift each), per-image
    noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pid = torch.randint(0, ids, (n,), generator=g)
    cam = torch.randint(0, cameras, (n,), generator=g)
    x = (torch.randn(ids, dim, generator=g)[pid] + 0.6 * torch.randn(cameras, dim, generator=g)[cam]
         + 0.8 * torch.randn(n, dim, generator=g))
    x = torch.nn.functional.normalize(x, dim=1).to(device)
    out = torch.empty(n * (n - 1) // 2, dtype=torch.float32, device=device)
    at, rows = 0, 1024
    for r0 in range(0, n - 1, rows):  # a row block of the triangle at a time
        r1 = min(n - 1, r0 + rows)
        block = 1.0 - x[r0:r1] @ x.T
        upper = torch.arange(n, device=device)[None, :] > torch.arange(r0, r1, device=device)[:, None]
        vals = block[upper]  # row-major: the condensed order
        out[at:at + vals.numel()] = vals
        at += vals.numel()
    return out


def pass_seconds(passes: np.ndarray, bytes_per_s=H100_BYTES_PER_S, sms=H100_SMS) -> np.ndarray:
    """Modelled GPU seconds of each pass (rows of cluster_rnn_passes), see the module docstring."""
    live, _, _, strided, contiguous = passes.T.astype(np.float64)
    moved = SECTOR_BYTES * strided + 4 * contiguous + SLOT_BYTES * live
    finish = live * SLOT_BYTES / (bytes_per_s / sms)
    floor = np.ceil(live / RESCAN_THREADS) * LATENCY_S
    return moved / bytes_per_s + 2 * ROUND_TRIP_S + 4 * LAUNCH_S + finish + floor


def merge_estimate(n=MSMT17["N"], ids=MSMT17["ids"], cameras=MSMT17["C"], seed=0,
                   cond=None) -> dict:
    """Measures the passes of the host instantiation on synthetic data of that shape (or on the
    given float32 condensed array `cond`) and models the H100 time of the CUDA merge; also
    returns the host's linkage matrix Z (the device's must equal it on the same distances)."""
    from iics_fast import cluster
    from iics_fast._native import native

    if cond is None:
        cond = synthetic_condensed(n, ids, cameras, seed=seed).numpy()
    n = (1 + math.isqrt(1 + 8 * cond.shape[0])) // 2
    tic = time.perf_counter()
    Z, passes = native().cluster_rnn_passes(cond, cluster.METHODS["average"])
    host_s = time.perf_counter() - tic
    per_pass = pass_seconds(passes)
    live, merges, rescans, strided, contiguous = passes.T
    return {
        "N": n, "passes": len(passes), "rescans": int(rescans.sum()),
        "strided": int(strided.sum()), "contiguous": int(contiguous.sum()),
        "gbytes": float((SECTOR_BYTES * strided + 4 * contiguous + SLOT_BYTES * live).sum() / 1e9),
        "estimate_s": float(per_pass.sum()), "host_passes_s": host_s, "passes_table": passes,
        "Z": Z,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--estimate", action="store_true",
                        help="H100 estimate of the CUDA merge (runs the host passes, ~minutes)")
    parser.add_argument("--n", type=int, default=MSMT17["N"], help="points of the estimate")
    args = parser.parse_args(argv)
    print_kernels(compile_all(args.arch))
    if args.estimate:
        print_estimate(merge_estimate(args.n, max(2, round(args.n / MSMT17["N"] * MSMT17["ids"]))))


def print_kernels(kernels):
    print(f"{'CUDA kernel':40s} {'sm':>3s} {'regs':>5s} {'spill':>6s} {'smem':>7s}  source")
    for k in kernels:
        print(f"{k.kernel:40s} {k.arch:3d} {k.registers:5d} {k.spill_bytes:6d} {k.shared_bytes:7d}"
              f"  {k.source}")


def print_estimate(e):
    print(f"\nCUDA merge (average linkage), H100 estimate at N = {e['N']:,} (synthetic distances of"
          f" that shape; passes measured by the host instantiation in {e['host_passes_s']:.1f} s):")
    print(f"  {e['passes']} passes, {e['rescans']:,} rescans, {e['strided']:.3g} entries across rows"
          f" (32 B each), {e['contiguous']:.3g} along rows (4 B), {e['gbytes']:.1f} GB in all")
    print(f"  estimate {e['estimate_s'] * 1e3:.1f} ms at {H100_BYTES_PER_S / 1e12:.2f} TB/s, with "
          f"{LAUNCH_S * 1e6:.0f} us a launch, {ROUND_TRIP_S * 1e6:.0f} us a round trip and "
          f"{LATENCY_S * 1e6:.1f} us a memory latency assumed")


if __name__ == "__main__":
    main()
