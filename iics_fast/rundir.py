"""The run folder (`--out`) from start to end, and atomic file writes.

A run owns its folder: `RunFolder.acquire()` takes an exclusive lock (`fcntl.flock` on
`run.lock`, held until the process ends, so a crash releases it) and refuses a second run at
once, naming the holder's pid and host. A new run writes only into a folder that is new or empty
(or holds nothing but an old lock and stale temporary files), unless the user passes
`--allow-nonempty-out`; even then it never overwrites a file of the names it writes. A default
`--out` is claimed with an exclusive `mkdir`, so two runs started in the same second get two
folders.

Every file is written to `<name>.tmp<pid>`, flushed to disk and renamed over `<name>`, so a
reader sees the old file or the new one, never a torn one. The checkpoint keeps its predecessor:
before the new `last.pt` is renamed into place, the current one is linked to `previous.pt`, and
`load_checkpoint` falls back to `previous.pt` (saying so) when `last.pt` is missing, truncated or
corrupt. Temporary files left by a killed run are removed by the next run that takes the lock.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import time

from .checkpoint import serialise, write_atomic, write_error

__all__ = ["RunFolder", "RunFolderError", "load_checkpoint", "read_checkpoint",
           "default_out", "check_writable", "OUTPUTS", "LOCK", "CHECKPOINT", "PREVIOUS"]

LOCK = "run.lock"
CHECKPOINT = "last.pt"
PREVIOUS = "previous.pt"
#: the files a run writes into its folder
OUTPUTS = (LOCK, CHECKPOINT, PREVIOUS, "best.pt", "config.json", "metrics.jsonl", "metrics.png",
           "similarity.png", "ranked_before.png", "ranked_after.png")
_TMP = re.compile(r"\.tmp\d+(\.\w+)?$")  # name.tmp<pid> and name.tmp<pid>.png
_CHECKPOINT_KEYS = ("config", "progress", "model")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked; the message says why and what to do."""


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system has them, else a synced copy."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                             errno.EXDEV):
            raise
        with open(src, "rb") as a, open(dst, "wb") as b:
            shutil.copyfileobj(a, b)
            b.flush()
            os.fsync(b.fileno())


def read_checkpoint(path: str, keys=_CHECKPOINT_KEYS):
    """(state, None) or (None, why it cannot be used): a torch file holding a dict with
    `keys`."""
    import torch

    if not os.path.isfile(path):
        return None, "missing"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn or foreign file raises anything from zip to pickle errors
        return None, f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    if not isinstance(state, dict) or any(k not in state for k in keys):
        return None, "not a training checkpoint"
    return state, None


def load_checkpoint(out: str, say=print):
    """The state of the run in `out`: `last.pt`, or `previous.pt` when `last.pt` cannot be
    read (said through `say`). Raises RunFolderError when neither can."""
    last, prev = os.path.join(out, CHECKPOINT), os.path.join(out, PREVIOUS)
    state, why = read_checkpoint(last)
    if state is not None:
        return state
    state, why_prev = read_checkpoint(prev)
    if state is not None:
        p = state["progress"]
        say(f"warning: {last} is {why}; resuming from {PREVIOUS}, the checkpoint before it "
            f"(round {p['round'] + 1}, {p['done'] or 'start'}): the work after it is redone")
        return state
    raise RunFolderError(f"--resume: {out} has no usable checkpoint ({CHECKPOINT}: {why}, "
                         f"{PREVIOUS}: {why_prev}); start a new run with another --out")


def default_out(dataset: str) -> str:
    """runs/<dataset>-<date>-<time>; `RunFolder(claim=True)` adds -2, -3, ... if it is taken."""
    return os.path.join("runs", f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}")


def _stale(name: str) -> bool:
    return bool(_TMP.search(name))


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_writable(out: str) -> None:
    """Raise RunFolderError unless the folder `out` exists or can be made, and is writable:
    its nearest existing path must be a folder we can write into."""
    base = _nearest_existing(out)
    if not os.path.isdir(base):
        raise RunFolderError(f"--out {out}: {base} is a file, not a folder; choose an --out "
                             f"that is a folder or does not exist yet")
    if not os.access(base, os.W_OK | os.X_OK):
        where = "it" if base == os.path.abspath(out) else f"{base}"
        raise RunFolderError(f"--out {out}: cannot write into {where} (permission denied); "
                             f"choose a folder you can write into")


class RunFolder:
    """The folder of one run: checked (`check`), locked (`acquire`), written (`save_checkpoint`,
    `write`), released (`release`, or the end of the process).

    resume: the folder must hold a run to continue; else it must be new or empty.
    allow_nonempty: a new run may write beside files it did not create (never over them).
    claim: `out` is a default name; `acquire` takes the first free one of out, out-2, ...
    """

    def __init__(self, out: str, *, resume: bool = False, allow_nonempty: bool = False,
                 claim: bool = False):
        self.out, self.resume, self.allow_nonempty, self.claim = out, resume, allow_nonempty, claim
        self._fd = None
        self.removed: list[str] = []  # stale temporary files removed by acquire

    # ------------------------------------------------------------------ checks (read only)

    def _ours_or_stale(self, names):
        return [n for n in names if n != LOCK and not _stale(n)]

    def check(self) -> None:
        """Raise RunFolderError if the run cannot use the folder; writes nothing."""
        out = self.out
        if os.path.exists(out) and not os.path.isdir(out):
            raise RunFolderError(f"--out {out} is a file, not a folder: choose a folder")
        if self.resume:
            if not os.path.isdir(out):
                raise RunFolderError(f"--resume: {out} does not exist; point --out at the "
                                     f"folder of the run to continue")
            names = os.listdir(out)
            if CHECKPOINT not in names and PREVIOUS not in names:
                raise RunFolderError(f"--resume: {out} holds no checkpoint ({CHECKPOINT}): "
                                     f"no run has written one there yet; start the run "
                                     f"without --resume")
            if not os.access(out, os.W_OK | os.X_OK):
                raise RunFolderError(f"--out {out}: cannot write into it (permission denied); "
                                     f"copy the run to a folder you can write and resume there")
            return
        check_writable(out)
        if self.claim or not os.path.isdir(out):
            return
        names = sorted(self._ours_or_stale(os.listdir(out)))
        if CHECKPOINT in names or PREVIOUS in names:
            raise RunFolderError(f"--out {out} holds another run: pass --resume to continue it, "
                                 f"or choose another --out")
        if names and not self.allow_nonempty:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise RunFolderError(f"--out {out} already holds files this run did not write "
                                 f"({shown}): choose a new or empty --out, or pass "
                                 f"--allow-nonempty-out to write beside them")
        clash = sorted(set(names) & set(OUTPUTS))
        if clash:
            raise RunFolderError(f"--out {out} holds {', '.join(clash)} from something else, "
                                 f"which this run would overwrite: move them away or choose "
                                 f"another --out")

    # ------------------------------------------------------------------ the lock

    def _make_folder(self) -> None:
        if not self.claim:
            try:
                os.makedirs(self.out, exist_ok=True)
            except OSError as exc:
                raise write_error(exc, os.path.join(self.out, LOCK), None) from None
            return
        base, k = self.out, 1
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
        while True:
            name = base if k == 1 else f"{base}-{k}"
            try:
                os.mkdir(name)
            except FileExistsError:
                k += 1
                continue
            except OSError as exc:
                raise write_error(exc, os.path.join(name, LOCK), None) from None
            self.out = name
            return

    def acquire(self) -> RunFolder:
        """Create and lock the folder, check it again under the lock, remove stale temporary
        files. Refuses at once when another run holds the folder."""
        if not self.claim and os.path.isfile(os.path.join(self.out, LOCK)):
            self._lock(create=False)  # a run's folder: a run holding it is named first
        else:
            self.check()
            self._make_folder()
            self._lock(create=True)
        try:
            self.check()  # what another run may have left before we held the lock
        except RunFolderError:
            self.release()
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (f"pid {os.getpid()} on host {socket.gethostname()}, since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
        for name in sorted(os.listdir(self.out)):
            if _stale(name):  # no run writes here but us: every temporary file is stale
                try:
                    os.unlink(os.path.join(self.out, name))
                    self.removed.append(name)
                except OSError:
                    pass
        return self

    def _lock(self, create: bool) -> None:
        path = os.path.join(self.out, LOCK)
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except OSError as exc:
            raise write_error(exc, path, None) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"--out {self.out} is in use by another run ({holder}): wait "
                                 f"for it to end, or choose another --out") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc):
        self.release()

    # ------------------------------------------------------------------ writing

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def write(self, name: str, data: bytes | str) -> None:
        write_atomic(self.path(name), data)

    def save_checkpoint(self, state: dict) -> None:
        """Write `last.pt`; the one it replaces becomes `previous.pt` (linked, never copied
        through a gap: at every moment `last.pt` is a complete checkpoint)."""
        write_atomic(self.path(CHECKPOINT), serialise(state), before_replace=self._keep_previous)

    def _keep_previous(self) -> None:
        last, link = self.path(CHECKPOINT), self.path(f"{PREVIOUS}.tmp{os.getpid()}")
        if not os.path.exists(last):
            return
        try:
            if os.path.exists(link):
                os.unlink(link)
            _link_or_copy(last, link)
            os.replace(link, self.path(PREVIOUS))
        except OSError:
            if os.path.exists(link):
                os.unlink(link)
            raise

    def load_checkpoint(self, say=print) -> dict:
        return load_checkpoint(self.out, say)
