"""Run state on disk and in the random generators: atomic writes (a crash never leaves a torn
file), the generators' states saved with a checkpoint, and per-stage seeds, so that a run resumed
from a checkpoint replays exactly what an uninterrupted run does."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


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


def _atomic_write(path: str, mode: str, write) -> None:
    """write(fh) into a temporary file beside `path`, fsync, then rename over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_save(obj, path: str) -> None:
    """torch.save to `path` atomically (never a torn file)."""
    _atomic_write(path, "wb", lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: str) -> None:
    """Writes `text` to `path` atomically."""
    _atomic_write(path, "w", lambda fh: fh.write(text))
