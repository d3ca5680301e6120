"""Access to the compiled extension iics_fast._C with an actionable error when it is missing."""
import importlib

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
