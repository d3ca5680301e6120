"""Faults a user can cause, each ending with the right result or a clear error and nothing lost:
bad options and data refused before any work, the run folder's lock and life cycle, kills at
every checkpoint and at random moments (SIGKILL, then --resume ends as the uninterrupted run),
a full disk, a corrupt checkpoint, an unwritable folder, the memory guard, atomic extraction
output, overflow-safe normalisation."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from iics_fast import checkpoint, rundir, train
from iics_fast.rundir import RunFolder, RunFolderError

DATA = {"num_ids": 8, "num_test_ids": 4, "num_cameras": 2, "images_per_camera": [2, 3],
        "num_distractors": 4, "seed": 3, "image_format": "png"}
TINY = ["--dataset", "synthetic", "--dataset-options", json.dumps(DATA),
        "--arch", "resnet18", "--height", "32", "--width", "16", "--rounds", "2",
        "--eval-every", "1", "--k-intra", "6", "--k-inter", "8", "--batch-per-camera", "4",
        "--batch-p", "4", "--batch-k", "2", "--epochs-intra", "1", "--epochs-inter", "1",
        "--batch-extract", "32", "--seed", "5", "--threads", "1", "--no-progress",
        "--no-verbose", "--pretrained", "none"]
QUIET = ["--no-progress", "--no-verbose"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    old = os.environ.get("IICS_FAST_CACHE")
    os.environ["IICS_FAST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield os.environ["IICS_FAST_CACHE"]
    if old is None:
        os.environ.pop("IICS_FAST_CACHE")
    else:
        os.environ["IICS_FAST_CACHE"] = old


def _cli(argv, cwd=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "iics_fast.train", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _strip(rows):
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


def _metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _snapshot(folder):
    """name -> bytes of every file under `folder`."""
    found = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            found[os.path.relpath(p, folder)] = Path(p).read_bytes()
    return found


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds 0 is out of range"),
    (["--rounds", "-1"], "--rounds -1 is out of range"),
    (["--batch-k", "0"], "--batch-k 0 is out of range"),
    (["--threshold-inter", "1.5"], "--threshold-inter 1.5 is out of range"),
    (["--mu", "nan"], "--mu is nan"),
    (["--margin", "nan"], "--margin is nan"),
    (["--lr-inter", "-0.001"], "--lr-inter -0.001 is out of range"),
    (["--lr-intra", "inf"], "--lr-intra is inf"),
    (["--height", "0"], "--height 0 is out of range"),
    (["--height", "16", "--width", "8"], "--height 16 --width 8 is too small: .* a 1x1 map"),
    (["--last-stride", "2"], r"a 1x1 map.*\(64 x 32 with --last-stride 2\)"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--dataset-options", '{"num_people": 3}'], r"unknown option\(s\) \['num_people'\]"),
    (["--rerank-k2", "30"], "--rerank-k2 30 exceeds --rerank-k1"),
    (["--inter-mode", "sparse", "--sparse-k", "0"], "--sparse-k 0 is out of range"),
    (["--inter-mode", "sparse", "--sparse-eps", "nan"], "--sparse-eps is nan"),
    (["--inter-mode", "sparse", "--sparse-eps", "1"], "--sparse-eps 1 is out of range"),
    (["--inter-mode", "sparse", "--sparse-max-per-block", "0"],
     "--sparse-max-per-block 0 is out of range"),
])
def test_bad_options_refused_before_anything(tmp_path, argv, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train.main(TINY + ["--out", str(out)] + argv)
    assert not out.exists()  # nothing written, not even the folder


def test_bad_options_from_a_config_file(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"mu": "0.1"}))
    with pytest.raises(ValueError, match=r"--mu must be a number .* got '0.1'"):
        train.main(TINY + ["--out", str(tmp_path / "run"), "--config", str(cfg)])
    for key, value, message in (("sparse_k", "a", r"--sparse-k must be an integer"),
                                ("sparse_eps", -0.5, r"--sparse-eps -0.5 is out of range"),
                                ("sparse_max_per_block", 2.5, r"--sparse-max-per-block must be an"),
                                ("supervised", "yes", r"--supervised must be true or false"),
                                ("inter_mode", "fast", r"--inter-mode must be one of dense, ")):
        cfg.write_text(json.dumps({key: value}))
        with pytest.raises(ValueError, match=message):
            train.main(TINY + ["--out", str(tmp_path / "run"), "--config", str(cfg)])
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid JSON file"):
        train.main(TINY + ["--out", str(tmp_path / "run"), "--config", str(cfg)])
    assert not (tmp_path / "run").exists()


def test_every_option_has_a_check():
    """Each option is in one of the check tables, and the command line's choices are the
    checked ones (one table)."""
    from iics_fast import config

    checked = (set(config._INTS) | set(config._REALS) | set(config._BOOLS)
               | set(config._STRINGS) | set(config.CHOICES)
               | {"dataset", "dataset_options", "device"})
    assert set(train.DEFAULTS) - checked == set()
    assert train.CHOICES is config.CHOICES
    # an option without a default value may stay unset
    assert {k for k, (v, _) in train.DEFAULTS.items() if v is None} - set(config._STRINGS) \
        <= config._OPTIONAL


def test_argparse_errors_stay_short(tmp_path, capsys):
    for argv, message in ((["--rounds", "abc"], "argument --rounds: invalid int value: 'abc'"),
                          (["--dataset-options", "{bad"], "not valid JSON")):
        with pytest.raises(SystemExit) as stop:
            train.main(argv + ["--out", str(tmp_path / "run")])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    # the command line prints a checked option's error without a traceback, status 2
    proc = _cli(["--device", "tpu", "--out", str(tmp_path / "run")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: --device 'tpu'" in proc.stderr


def test_ctrl_c_says_how_to_continue(capsys):
    from iics_fast.cli import run

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as stop:
        run(interrupted, interrupted="continue with --resume")
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted; continue with --resume\n"


# ----------------------------------------------------------------------------- the run folder


def test_second_run_refused_at_once_naming_the_holder(tmp_path):
    out = str(tmp_path / "run")
    first = RunFolder(out).acquire()
    try:
        with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {os.getpid()} "
                                                 rf"on host "):
            RunFolder(out).acquire()
        with pytest.raises(RunFolderError, match="in use by another run"):
            RunFolder(out, resume=True, allow_nonempty=True).acquire()
    finally:
        first.release()
    RunFolder(out).acquire().release()  # free again once released


def test_default_names_never_collide(tmp_path):
    base = str(tmp_path / "runs" / "synthetic-20260101-000000")
    folders = [RunFolder(base, claim=True).acquire() for _ in range(3)]
    assert [os.path.basename(f.out) for f in folders] == [
        "synthetic-20260101-000000", "synthetic-20260101-000000-2", "synthetic-20260101-000000-3"]
    for f in folders:
        f.release()


def test_folder_with_foreign_files_is_not_written(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"already holds files .*\(notes.txt\).*"
                                             r"--allow-nonempty-out"):
        RunFolder(str(out)).acquire()
    assert sorted(os.listdir(out)) == ["notes.txt"]
    folder = RunFolder(str(out), allow_nonempty=True).acquire()  # said so: beside them
    folder.release()
    (out / "best.pt").write_bytes(b"someone else's")
    with pytest.raises(RunFolderError, match="holds best.pt from something else"):
        RunFolder(str(out), allow_nonempty=True).acquire()
    assert (out / "best.pt").read_bytes() == b"someone else's"
    (out / "best.pt").unlink()
    (out / "ranked_before.png").write_bytes(b"my figure")  # the ranked lists too
    with pytest.raises(RunFolderError, match="holds ranked_before.png from something else"):
        RunFolder(str(out), allow_nonempty=True).acquire()


def test_out_under_a_file_refused_as_such(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(RunFolderError, match=r"afile is a file, not a folder"):
        RunFolder(str(tmp_path / "afile" / "sub")).acquire()


def test_stale_temporary_files_removed_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    folder = RunFolder(str(out)).acquire()
    folder.save_checkpoint({"config": {}, "progress": {"round": 0, "done": None}, "model": {}})
    folder.release()
    for name in ("last.pt.tmp4242", "metrics.png.tmp77.png", "config.json.tmp9"):
        (out / name).write_bytes(b"torn")
    folder = RunFolder(str(out), resume=True).acquire()
    assert sorted(folder.removed) == ["config.json.tmp9", "last.pt.tmp4242",
                                      "metrics.png.tmp77.png"]
    assert sorted(os.listdir(out)) == ["last.pt", "run.lock"]
    folder.release()


def _state(k):
    return {"config": {"k": k}, "progress": {"round": k, "done": "round"}, "model": {}}


def test_checkpoint_keeps_its_predecessor_and_falls_back(tmp_path):
    out = str(tmp_path / "run")
    folder = RunFolder(out).acquire()
    for k in range(3):
        folder.save_checkpoint(_state(k))
    assert _load(os.path.join(out, "last.pt"))["config"] == {"k": 2}
    assert _load(os.path.join(out, "previous.pt"))["config"] == {"k": 1}
    data = Path(out, "last.pt").read_bytes()
    Path(out, "last.pt").write_bytes(data[: len(data) // 2])  # truncated
    said = []
    assert folder.load_checkpoint(said.append)["config"] == {"k": 1}
    assert "last.pt is unreadable" in said[0] and "resuming from previous.pt" in said[0]
    Path(out, "previous.pt").write_bytes(b"garbage")
    with pytest.raises(RunFolderError, match="no usable checkpoint"):
        folder.load_checkpoint()
    folder.release()


class _FullDisk:
    """A file whose writes fail with ENOSPC after `room` bytes (the simulated full disk)."""

    def __init__(self, path, mode, room):
        self.fh, self.room = open(path, mode), room  # noqa: SIM115 (closed by the wrapper)

    def write(self, data):
        if len(data) > self.room:
            self.fh.write(data[: self.room])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _check_full_disk(out, folder):
    before = Path(out, "last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"the disk holding .* is full: could not write "
                                         r"last.pt \(.* to write\)"):
        folder.save_checkpoint({**_state(2), "model": {"w": torch.zeros(400_000)}})
    assert Path(out, "last.pt").read_bytes() == before  # intact
    assert not [n for n in os.listdir(out) if ".tmp" in n]  # no torn temporary left
    with pytest.raises(ValueError, match="is full: could not write metrics.jsonl"):
        folder.write("metrics.jsonl", "x" * 2_000_000)


def test_full_disk_simulated(tmp_path, monkeypatch):
    # the writer's file object raises ENOSPC, as a full disk does
    out = str(tmp_path / "run")
    folder = RunFolder(out).acquire()
    folder.save_checkpoint(_state(1))
    for module in (rundir, checkpoint):
        monkeypatch.setattr(module, "open", lambda p, m="r": _FullDisk(p, m, 100_000),
                            raising=False)
    _check_full_disk(out, folder)
    folder.release()


def _tmpfs(tmp_path, size):
    """A tmpfs of `size` (needs root and a kernel that lets us mount; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (test_full_disk_simulated covers the writer)")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    yield from _tmpfs(tmp_path, "1m")


def test_full_disk_on_a_real_small_disk(small_disk):
    out = os.path.join(small_disk, "run")
    folder = RunFolder(out).acquire()
    folder.save_checkpoint(_state(1))
    _check_full_disk(out, folder)
    folder.release()


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write: a read-only tmpfs as root, chmod 555 otherwise."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield str(ro)
        ro.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("root without mount: every folder is writable")
    yield str(ro)
    subprocess.run(["umount", str(ro)], check=True)


def test_unwritable_folder_refused_before_any_work(cache, read_only_folder):
    out = os.path.join(read_only_folder, "run")
    with pytest.raises(ValueError, match=r"cannot write into .* choose a folder you can write"):
        train.main(TINY + ["--out", out])
    with pytest.raises(ValueError, match="cannot write into"):
        RunFolder(read_only_folder, allow_nonempty=True).acquire()


# ----------------------------------------------------------------------------- data and numerics


@pytest.mark.parametrize("name, preset", [("msmt", "msmt17"), ("MSMT17", "msmt17"),
                                          ("Market", "market1501"), ("Synthetic", "synthetic")])
def test_dataset_aliases_get_their_presets(name, preset):
    config = train.resolve(train.parse_args(["--dataset", name]))
    expected = train.resolve(train.parse_args(["--dataset", preset]))
    assert config["dataset"] == preset
    assert {k: v for k, v in config.items() if k != "out"} == {
        k: v for k, v in expected.items() if k != "out"}


def test_paths_that_are_files_or_unwritable_named_as_such(tmp_path, monkeypatch):
    from iics_fast import datasets

    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=r"afile is a file, not a folder \(the market1501 root\)"):
        datasets.build("market1501", str(afile))
    with pytest.raises(ValueError, match=r"cannot make the synthetic set's folder .*afile.*"
                                         r"\$IICS_FAST_CACHE"):
        datasets.build("synthetic", str(afile / "cache"), **DATA)
    with pytest.raises(ValueError, match=r"pid_regex must be a regular expression as a string"):
        datasets.build("folder", str(tmp_path), pid_regex=5)


def test_dataset_messages_in_the_users_terms(tmp_path):
    from iics_fast import datasets
    from iics_fast.data.samplers import CameraBatchSampler

    img = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (8, 16)).save(img)
    rows = ["path,camid", "a.png,lobby", "a.png,gate"]
    (tmp_path / "dup.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"dup.csv:3: a.png is listed again \(first at line 2\)"):
        datasets.build("folder", str(tmp_path / "dup.csv"))
    for name in ("b.png", "c.png"):
        shutil.copy(img, tmp_path / name)
    (tmp_path / "bom.csv").write_bytes("\ufeffpath,camid\na.png,lobby\nb.png,gate\nc.png,gate\n"
                                       .encode("utf-8"))
    ds = datasets.build("folder", str(tmp_path / "bom.csv"))
    assert len(ds.train) == 3 and ds.camera_names == ["gate", "lobby"]
    camids = np.array([c for _, _, c in ds.train])
    with pytest.raises(ValueError, match="camera lobby has 1 training images"):
        CameraBatchSampler(camids, 2, camera_name=ds.camera_name)
    (tmp_path / "latin.csv").write_bytes("path,camid\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv:2: the file is not UTF-8 text \(byte 0xe9\)"):
        datasets.build("folder", str(tmp_path / "latin.csv"))


def test_damaged_pretrained_weights_refused_before_training(cache, tmp_path):
    from iics_fast import models

    state = models.build_backbone("resnet18").state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"holds NaN or infinite values in 1 tensors, e\.g\. "
                                         r"\['layer1.0.conv1.weight'\]"):
        train.main(TINY + ["--out", str(tmp_path / "run"), "--pretrained",
                           str(tmp_path / "r18.pth")])
    assert not (tmp_path / "run").exists()


def test_market_cameras_named_c1_to_c6(cache):
    from iics_fast import datasets

    ds = datasets.build("synthetic", None, **DATA)
    assert [ds.camera_name(c) for c in range(ds.num_cameras)] == ["c1", "c2"]


def test_one_camera_refused_for_the_inter_camera_stage(tmp_path):
    from PIL import Image

    for k in range(10):
        Image.new("RGB", (16, 32), (20 * k, 0, 0)).save(tmp_path / f"{k}.png")
    (tmp_path / "train.csv").write_text("".join(f"{k}.png,lobby\n" for k in range(10)))
    argv = TINY + ["--dataset", "folder", "--root", str(tmp_path / "train.csv"),
                   "--dataset-options", "{}", "--out", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=r"one camera \(lobby\).*--stages intra"):
        train.main(argv)
    assert not (tmp_path / "run").exists()


def test_huge_and_tiny_features_give_the_reference_distances(rng):
    from iics_fast.similarity import inter_camera_distance

    f = torch.from_numpy(rng.normal(size=(61, 24)).astype(np.float32))
    s = torch.from_numpy(rng.random((61, 10)).astype(np.float32))
    c = torch.from_numpy(rng.integers(0, 3, 61))
    want = inter_camera_distance(f, s, c, backend="ref")
    for scale in (1e19, 1e30, 1e-30):
        got = inter_camera_distance(f * scale, s, c, backend="cpu")
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_infinite_features_refused_like_nan():
    from iics_fast.evaluation import evaluate_features

    q, g = np.ones((2, 4), np.float32), np.ones((3, 4), np.float32)
    g[1, 2] = np.inf
    with pytest.raises(ValueError, match="gf has 1 NaN or infinite entries"):
        evaluate_features(q, g, [1, 2], [1, 2, 3], [0, 0], [1, 1, 1])


# ----------------------------------------------------------------------------- memory guard


def test_memory_guard_before_every_n2_allocation(monkeypatch, rng):
    from iics_fast import cluster, memory, rerank
    from iics_fast.similarity import inter_camera_distance

    n = 400  # a condensed matrix of 319 KiB against a 64 KiB limit
    f = torch.from_numpy(rng.normal(size=(n, 8)).astype(np.float32))
    s = torch.from_numpy(rng.random((n, 4)).astype(np.float32))
    c = torch.from_numpy(rng.integers(0, 3, n))
    d = inter_camera_distance(f, s, c).numpy()
    monkeypatch.setenv("IICS_FAST_MEMORY_LIMIT", "64K")
    with pytest.raises(memory.NotEnoughMemory, match=r"the inter-camera distance of N = 400 "
                                                     r"images \(condensed\) needs .* but 64\.0 KiB "
                                                     r"is available \(IICS_FAST_MEMORY_LIMIT\): "
                                                     r"use fewer images .* or train with "
                                                     r"--inter-mode sparse"):
        inter_camera_distance(f, s, c)
    with pytest.raises(MemoryError, match="re-ranking N = 400 samples .* pass out=dist"):
        rerank.k_reciprocal(d)
    with pytest.raises(ValueError, match="the clustering's copy .* pass inplace=True"):
        cluster.agglomerative(d, n_clusters=5)
    monkeypatch.setenv("IICS_FAST_MEMORY_LIMIT", "1G")
    assert len(cluster.agglomerative(d, n_clusters=5)) == n


def test_memory_guard_refuses_a_run_before_any_work(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("IICS_FAST_MEMORY_LIMIT", "4K")
    with pytest.raises(MemoryError, match=r"one training round: the inter-camera distance .* "
                                          r"needs .* but 4\.0 KiB.* or train with --inter-mode sparse"):
        train.main(TINY + ["--out", str(tmp_path / "run")])
    # the sparse round is not offered where it would change nothing or cannot run
    for argv in (["--stages", "intra"], ["--inter-mode", "sparse"], ["--inter-similarity", "jaccard"],
                 ["--threshold-inter", "0.0017"]):
        with pytest.raises(MemoryError, match=r"one training round: ") as err:
            train.main(TINY + ["--out", str(tmp_path / "run")] + argv)
        assert "--inter-mode" not in str(err.value), argv
    assert not (tmp_path / "run").exists()


def test_memory_available_reads_the_machine(monkeypatch):
    from iics_fast import memory

    have, source = memory.available()
    assert have is None or (have > 0 and source)
    # a container's cgroup limit lowers what MemAvailable says
    files = {"/sys/fs/cgroup/memory.max": 3 * 2**30, "/sys/fs/cgroup/memory.current": 2**30}
    monkeypatch.setattr(memory, "_read_int", files.get)
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 8 * 2**30)
    assert memory.available() == (2 * 2**30, "left by the cgroup limit")
    files["/sys/fs/cgroup/memory.max"] = None  # "max": no limit
    assert memory.available() == (8 * 2**30, "MemAvailable")


# ----------------------------------------------------------------------------- extraction


def test_extract_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_bytes(b"not a checkpoint at all")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "iics_fast.extract", "features", str(bad),
                           str(tmp_path), "--save", str(tmp_path / "f.npy")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is not an iics_fast training checkpoint (unreadable" in proc.stderr
    torch.save({"weights": 1}, bad)  # a torch file, but not a run's
    from iics_fast import extract
    with pytest.raises(ValueError, match="not an iics_fast training checkpoint .not a training"):
        extract.load_model(str(bad))


def test_failed_extraction_keeps_the_previous_output(tmp_path, monkeypatch):
    import errno

    from iics_fast import extract
    from iics_fast.checkpoint import WriteError

    feats = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    target = str(tmp_path / "g.npy")
    extract.save_features(feats, ["a.png", "b.png", "c.png"], target)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="holds a line break"):
        extract.save_features(feats, ["a.png", "b\n.png", "c.png"], target)
    with pytest.raises(ValueError, match="3 feature rows for 2 paths"):
        extract.save_features(feats, ["a.png", "b.png"], target)
    assert _snapshot(tmp_path) == before
    # the disk fills while the new .npy (first sync) or the new list (second) is written: the
    # previous pair stays, neither file replaced
    real_fsync = os.fsync
    for fail_at in (1, 2):
        calls = []

        def fsync(fd, calls=calls, fail_at=fail_at):
            calls.append(fd)
            if len(calls) == fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(WriteError, match=r"is full: could not write g\.(npy|txt)"):
            extract.save_features(torch.randn(4, 8), ["a.png", "b.png", "c.png", "d.png"], target)
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert _snapshot(tmp_path) == before, fail_at
    # a name that is not UTF-8 is kept byte for byte
    odd = os.fsdecode(b"caf\xe9.png")
    extract.save_features(feats, ["a.png", odd, "c.png"], target)
    assert extract.load_features(target)[1][1] == odd
    # rows and paths that do not belong together
    (tmp_path / "g.txt").write_text("a.png\n")
    with pytest.raises(ValueError, match=r"holds \(3, 8\) features but .*g.txt' lists 1 paths: "
                                         r"they do not belong together"):
        extract.load_features(target)


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    return out, train.main(TINY + ["--out", out])


def _assert_same_run(out, reference):
    ref_out, ref_metrics = reference
    assert _strip(_metrics(out)) == _strip(json.loads(json.dumps(ref_metrics)))
    a, b = _load(os.path.join(out, "last.pt")), _load(os.path.join(ref_out, "last.pt"))
    np.testing.assert_array_equal(a["inter_labels"], b["inter_labels"])
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=0, atol=0)


_KILLER = """
import os, signal, sys
from iics_fast import checkpoint, rundir, train
event, argv = sys.argv[1], sys.argv[2:]
if event.startswith("write:"):  # die inside the Nth checkpoint write, between its renames
    n, real = [int(event[6:])], rundir.os.replace
    def replace(a, b):
        if b.endswith("last.pt"):
            n[0] -= 1
            if n[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b)
    rundir.os.replace = replace
    hook = None
else:
    def hook(ev, r):
        if f"{ev}@{r}" == event:
            os.kill(os.getpid(), signal.SIGKILL)
train.main(argv, hook=hook)
"""


def _killed_run(event, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILLER, event, *TINY, "--out", out], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("event", ["start@0", "initial eval@0", "stage1@0", "stage2@1",
                                   "write:1", "write:4"])
def test_sigkill_at_a_checkpoint_then_resume_ends_as_the_uninterrupted_run(reference, tmp_path,
                                                                            event):
    out = str(tmp_path / "run")
    _killed_run(event, out)
    if event == "write:1":  # killed inside the first checkpoint: nothing to resume from, and
        # the folder (a lock and a torn temporary file) starts the run again as if empty
        assert sorted(os.listdir(out))[1:] == ["run.lock"]
        assert sorted(os.listdir(out))[0].startswith("last.pt.tmp")
        proc = _cli(["--resume", "--out", out] + QUIET)
        assert proc.returncode == 2 and "holds no checkpoint" in proc.stderr
        proc = _cli(TINY + ["--out", out])
        assert "removed 1 temporary file(s) a stopped run left" in proc.stdout
    else:
        RunFolder(out, resume=True).acquire().release()  # the lock died with the process
        proc = _cli(["--resume", "--out", out] + QUIET)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_run(out, reference)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(reference, tmp_path):
    """Kills at seeded random moments of a run (mid-phase, mid-write); each folder resumes."""
    rng = np.random.default_rng(18)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = str(tmp_path / "run")
    for delay in rng.uniform(2.0, 12.0, size=2):
        proc = subprocess.Popen([sys.executable, "-m", "iics_fast.train", *TINY, "--out", out]
                                if not os.path.exists(out) else
                                [sys.executable, "-m", "iics_fast.train", "--resume", "--out",
                                 out, *QUIET], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if not os.path.exists(os.path.join(out, "last.pt")):  # killed before its first checkpoint
        assert set(os.listdir(out)) <= {"run.lock"} | {n for n in os.listdir(out) if ".tmp" in n}
        proc = _cli(TINY + ["--out", out])
    else:
        proc = _cli(["--resume", "--out", out] + QUIET)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_run(out, reference)


@pytest.mark.slow
def test_corrupt_last_checkpoint_falls_back_and_resume_still_matches(reference, tmp_path):
    out = str(tmp_path / "run")
    _killed_run("stage2@0", out)
    with open(os.path.join(out, "last.pt"), "r+b") as fh:
        fh.truncate(1000)
    proc = _cli(["--resume", "--out", out] + QUIET)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "last.pt is unreadable" in proc.stdout + proc.stderr
    assert "resuming from previous.pt" in proc.stdout + proc.stderr
    _assert_same_run(out, reference)


@pytest.mark.slow
def test_two_concurrent_runs_one_folder(cache, tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "iics_fast.train", *TINY, "--out", out],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(out, "last.pt")) and time.time() < deadline:
        time.sleep(0.2)
    second = _cli(TINY + ["--out", out])
    assert second.returncode == 2
    assert "holds another run" in second.stderr or "in use by another run" in second.stderr
    resumed = _cli(["--resume", "--out", out] + QUIET)
    assert resumed.returncode == 2 and "in use by another run (pid" in resumed.stderr
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert len(_metrics(out)) == 2


@pytest.mark.slow
def test_two_default_runs_in_the_same_second_get_two_folders(cache, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "iics_fast.train", *TINY, "--rounds", "1"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert len(runs) == 2
    for name in runs:
        assert len(_metrics(str(tmp_path / "runs" / name))) == 1


@pytest.mark.slow
def test_full_disk_mid_run_then_resume_elsewhere(reference, small_disk_120m, tmp_path):
    out = os.path.join(small_disk_120m, "run")
    proc = _cli(TINY + ["--out", out])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is full: could not write" in proc.stderr
    state = _load(os.path.join(out, "last.pt"))  # the checkpoint before the failure is whole
    assert state["progress"]["round"] <= 1
    moved = str(tmp_path / "moved")
    shutil.copytree(out, moved)
    proc = _cli(["--resume", "--out", moved] + QUIET)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_run(moved, reference)


@pytest.fixture
def small_disk_120m(tmp_path):
    """Room for two ResNet-18 checkpoints of the tiny run, not three."""
    yield from _tmpfs(tmp_path, "120m")


@pytest.mark.slow
def test_resume_accepts_a_moved_dataset_and_refuses_another(reference, cache, tmp_path):
    out = str(tmp_path / "run")
    _killed_run("stage1@1", out)
    from iics_fast import datasets
    ds = datasets.build("synthetic", None, **DATA)
    moved = tmp_path / "moved"  # the synthetic set's folder, elsewhere
    shutil.copytree(cache, moved)
    train_dir = moved / os.path.relpath(ds.root, cache) / "bounding_box_train"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"k_inter": 9}))
    proc = _cli(["--resume", "--out", out, "--config", str(cfg)] + QUIET)
    assert proc.returncode == 2 and "--k-inter 9 (saved 8)" in proc.stderr
    # a different training set under the given root
    victim = sorted(train_dir.iterdir())[0]
    victim.rename(victim.with_name("0999_c1s1_000001_01.png"))
    proc = _cli(["--resume", "--out", out, "--root", str(moved)] + QUIET)
    assert proc.returncode == 2 and "is not the one the run was trained on" in proc.stderr
    victim.with_name("0999_c1s1_000001_01.png").rename(victim)
    proc = _cli(["--resume", "--out", out, "--root", str(moved), "--threads", "1"] + QUIET)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_run(out, reference)
