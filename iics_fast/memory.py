"""A memory check before every N x N allocation.

The inter-camera distance, the re-ranking, the clustering's copy and the profiler hold arrays
that grow with the square of the number of images. Allocating one that does not fit ends in the
kernel's OOM killer (a lost process, no message) or a deep allocator traceback. `require`
compares the bytes a step needs with what the machine can give, and raises `NotEnoughMemory`
(a MemoryError, also a ValueError so the command lines print it as an error) naming the step,
the size needed, the size available and the ways out.

Available memory on the CPU: `MemAvailable` of /proc/meminfo, lowered to what the cgroup
(container) limit leaves (cgroup v2 `memory.max - memory.current`, or v1
`memory.limit_in_bytes - memory.usage_in_bytes`). On a CUDA device: `torch.cuda.mem_get_info`
plus what torch's caching allocator holds free. Where none of these can be read the check
passes. `IICS_FAST_MEMORY_LIMIT` (bytes, or with a K/M/G/T suffix) caps the figure, to test
the check or to keep a share of a machine free.
"""
from __future__ import annotations

import os

__all__ = ["NotEnoughMemory", "available", "require", "format_bytes", "resident", "status_kib"]


class NotEnoughMemory(MemoryError, ValueError):
    """A step would allocate more memory than is available."""


def format_bytes(n: float) -> str:
    """A byte count as people read it: 512 B, 1.5 KiB, 3.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def status_kib(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM, ...) in KiB; OSError where there is none."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def resident():
    """(resident, peak resident) bytes of this process (VmRSS, VmHWM), or None where the system
    does not say."""
    try:
        return status_kib("VmRSS") * 1024, status_kib("VmHWM") * 1024
    except OSError:
        return None


def _read_int(path: str):
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_left():
    """Bytes the cgroup limit leaves, or None without a limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 2**60:
            return max(0, cap - used)
    return None


def _env_limit():
    text = os.environ.get("IICS_FAST_MEMORY_LIMIT", "").strip().upper()
    if not text:
        return None
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1], 1)
    number = text[:-1] if text[-1] in "KMGT" else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ValueError(f"IICS_FAST_MEMORY_LIMIT={text!r} is not a size such as 8G") from None


def available(device=None):
    """(bytes available, where the figure comes from), or (None, "") when unknown."""
    import torch

    found = []
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        found.append((free + cached, f"free on {device}"))
    else:
        mem = _meminfo_available()
        if mem is not None:
            found.append((mem, "MemAvailable"))
        left = _cgroup_left()
        if left is not None:
            found.append((left, "left by the cgroup limit"))
    cap = _env_limit()
    if cap is not None:
        found.append((cap, "IICS_FAST_MEMORY_LIMIT"))
    if not found:
        return None, ""
    return min(found)


#: what to do when a step of a round does not fit (the N x N inter-camera distance also has
#: the sparse round)
FEWER_IMAGES = ("use fewer images (a subset of the cameras or of each camera's images) or a "
                "machine with more memory")
SPARSE_ROUND = ", or train with --inter-mode sparse (no N x N matrix)"


def require(nbytes: int, what: str, *, device=None, way_out: str | None = None) -> None:
    """Raise NotEnoughMemory if `nbytes` for `what` exceed the memory available (`way_out`:
    the fix the message gives; by default that of the N x N inter-camera distance)."""
    have, source = available(device)
    if have is None or nbytes <= have:
        return
    if way_out is None:
        way_out = FEWER_IMAGES + SPARSE_ROUND
    raise NotEnoughMemory(f"{what} needs {format_bytes(nbytes)} but {format_bytes(have)} is "
                          f"available ({source}): {way_out}")
