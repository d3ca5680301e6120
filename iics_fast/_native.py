"""Access to the compiled extension iics_fast._C with an actionable error when it is missing,
and the CPU it runs on."""
import importlib
import platform

_module = None


def native():
    """Return the extension module iics_fast._C, or raise ImportError saying how to build it."""
    global _module
    if _module is None:
        try:
            _module = importlib.import_module("iics_fast._C")
        except ImportError as exc:
            raise ImportError(
                "the native extension iics_fast._C is not built or failed to load "
                f"({exc}). Build it with `pip install -e .` from the repository root "
                "(needs a C++17 compiler), or `cmake -S . -B build && cmake --build build`."
            ) from exc
    return _module


def cpu_info() -> dict:
    """The CPU's model name, family and model numbers and feature flags as Linux lists them in
    /proc/cpuinfo ("model": `platform`'s answer, no numbers and "flags" empty elsewhere). The
    numbers tell apart CPUs sold under one name (an "AMD EPYC" of family 25 or 26)."""
    info = {"model": platform.processor() or platform.machine(), "flags": set()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    info["model"] = value.strip()
                elif key in ("cpu family", "model") and value.strip().isdigit():
                    info["family" if key == "cpu family" else "model_number"] = int(value)
                elif key == "flags":
                    info["flags"] = set(value.split())
                    break
    except OSError:
        pass
    return info
