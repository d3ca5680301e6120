"""Process probes shared by the tests and the benchmarks: a free local port for a gloo
rendezvous, the peak resident memory of a block of code, and a fresh Python process to measure
it in (a process of its own, so that what pytest or an earlier case left resident does not count).

    with PeakMemory() as mem:
        work()
    mem.grew_mib    # the peak resident size during the block above the size at its start
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import socket
import subprocess
import sys
import threading
from pathlib import Path

from iics_fast._native import cpu_info, native
from iics_fast.memory import status_kib

ROOT = Path(__file__).resolve().parent.parent


def machine_info() -> dict:
    """CPU model, SIMD, cores, memory and library versions: where a record was measured."""
    cpu = cpu_info()
    info = {"cpu": cpu["model"], "cpu_family": cpu.get("family"), "cpu_model": cpu.get("model_number"),
            "cores": os.cpu_count(),
            "simd": [s for s in ("avx512f", "avx2", "fma") if s in cpu["flags"]],
            "python": platform.python_version()}
    with contextlib.suppress(ValueError, OSError):
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    for mod in ("numpy", "torch", "scipy", "fastcluster", "faiss"):
        with contextlib.suppress(Exception):
            info[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        info["iics_simd"] = native().simd_variant()
    return info


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now, for MASTER_PORT (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def can_reset_peak() -> bool:
    """Whether this process may reset its peak resident size (Linux >= 4.0)."""
    return os.access("/proc/self/clear_refs", os.W_OK)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def _process_symbols():
    try:
        return ctypes.CDLL(None)  # the C library's symbols, as this process links them
    except OSError:
        return None


_LIBC = _process_symbols()
HAVE_MALLOC_TRIM = _LIBC is not None and hasattr(_LIBC, "malloc_trim")  # glibc


def _release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim; elsewhere nothing), so
    that memory freed before a measured block and reused inside it shows as growth."""
    if HAVE_MALLOC_TRIM:
        _LIBC.malloc_trim(0)


class PeakMemory:
    """Peak resident memory of this process during a `with` block: `peak_mib` (the whole
    process) and `grew_mib` (above the resident size at the block's start: what the block
    itself needed). The C heap's free pages are released first (malloc_trim), so the block
    cannot hide its needs in memory freed before it. VmHWM, reset at the start through
    /proc/self/clear_refs; where that is refused, VmRSS sampled every 2 ms (`sampled` is then
    True and a short peak may be missed)."""

    def __enter__(self) -> PeakMemory:
        _release_free_heap()
        self.start_kib = status_kib("VmRSS")
        self.sampled = not _reset_peak()
        if self.sampled:
            self._peak = self.start_kib
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, status_kib("VmRSS"))
            self._stop.wait(0.002)

    def __exit__(self, *exc) -> None:
        if self.sampled:
            self._stop.set()
            self._thread.join()
            self.peak_kib = max(self._peak, status_kib("VmRSS"))
        else:
            self.peak_kib = status_kib("VmHWM")
        self.peak_mib = self.peak_kib / 1024
        self.grew_mib = (self.peak_kib - self.start_kib) / 1024


def run_python(script: str, *args, timeout: float | None = None) -> str:
    """Run `script` in a fresh Python process (`python -c script args...`) with the repository
    root importable; return its standard output, or raise with its standard error."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=path))
    if proc.returncode != 0:
        raise RuntimeError(f"the probe exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.stdout
