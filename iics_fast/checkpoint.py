"""Run state on disk and in the random generators: atomic writes (a crash never leaves a torn
file), the generators' states saved with a checkpoint, and per-stage seeds, so that a run resumed
from a checkpoint replays exactly what an uninterrupted run does."""
from __future__ import annotations

import errno
import io
import contextlib
import os
import random

import numpy as np
import torch

from .memory import format_bytes


def derive_seed(seed: int, *keys: int) -> int:
    """A seed for one (round, stage) of the run, independent of everything before it."""
    return int(np.random.default_rng([int(seed), *map(int, keys)]).integers(0, 2**62))


def rng_states() -> dict:
    """The states of Python's, NumPy's, torch's (and CUDA's) global generators."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    """Restores what `rng_states` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class WriteError(ValueError):
    """A file could not be written; the message says why (a full disk, no permission)."""


def write_error(exc: OSError, path: str, nbytes: int | None = None) -> WriteError:
    """An OSError of writing `path` in the user's terms."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    need = f" ({format_bytes(nbytes)} to write)" if nbytes else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return WriteError(f"the disk holding {folder} is full: could not write "
                          f"{os.path.basename(path)}{need}; free space there (or choose another "
                          f"folder); files written before are intact")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WriteError(f"cannot write into {folder} ({exc.strerror}): choose a folder you can "
                          f"write into")
    return WriteError(f"could not write {path}: {exc.strerror or exc}")


def fsync_dir(folder: str) -> None:
    """Makes a rename in `folder` durable (where the file system can sync a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes | str, before_replace=None) -> None:
    """Write `data` to `path` through `path.tmp<pid>` + fsync + rename: the old file stays whole
    until the new one is complete (`before_replace()` runs between the two, e.g. to keep the
    old file under another name). A failure removes the temporary file; one of writing raises
    WriteError saying why."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as exc:  # the temporary file goes, whatever failed (before_replace too)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(exc, path, len(data)) from None
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def serialise(obj) -> bytes:
    """torch.save into memory: a full disk is then reported by the write, not as a failure
    deep in the serialiser."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_save(obj, path: str) -> None:
    """torch.save to `path` atomically (never a torn file)."""
    write_atomic(path, serialise(obj))
