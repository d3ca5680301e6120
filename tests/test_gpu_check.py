"""benchmarks/gpu_check.sh and its Python part without a GPU: the dry run (CPU fallbacks at small
sizes) end to end, the kernel rows, and the table built from a work folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_rows_pass_on_the_cpu():
    rows = gpu_check.run_rows(dry_run=True, repeats=1)
    assert [r["kernel"] for r in rows] == ["inter_camera_eq5_fp32", "cuda merge (average)",
                                          "aibn fwd+bwd fp32"]
    assert all(r["ok"] for r in rows), rows
    assert rows[0]["estimate_s"] > 0 and rows[1]["estimate_s"] > 0 and rows[2]["estimate_s"] is None
    assert rows[1]["check"] == "Z equals host passes"


def test_failing_row_is_reported_not_raised(monkeypatch):
    def broken(device, scale, repeats):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "aibn_row", broken)
    monkeypatch.setattr(gpu_check, "distance_row", broken)
    monkeypatch.setattr(gpu_check, "merge_row", broken)
    rows = gpu_check.run_rows(dry_run=True)
    assert [r["ok"] for r in rows] == [False] * 3 and "boom" in rows[0]["check"]


def test_summary_table(tmp_path):
    (tmp_path / "steps.tsv").write_text("gpu_tests\t0\t12\t180\nkernels\t124\t150\t150\n")
    row = {"kernel": "k", "scale": "N=5", "time_s": 0.002, "estimate_s": 0.001, "check": "fine",
           "ok": True}
    (tmp_path / "kernels.json").write_text(json.dumps([row]))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.jsonl").write_text(
        "".join(json.dumps({"round": r, "time": {"extract": 1.5, "stage1": 2.0}}) + "\n"
                for r in range(2)))
    table, ok = gpu_check.summary(str(tmp_path))
    assert not ok  # the kernels step timed out
    assert "kernels                   TIMEOUT      150     150" in table
    assert gpu_check.format_row(row) in table
    assert table.splitlines()[-1].split() == ["1", "1.50", "2.00"]
    (tmp_path / "steps.tsv").write_text("gpu_tests\t0\t12\t180\n")
    assert gpu_check.summary(str(tmp_path))[1]
    os.remove(tmp_path / "train" / "metrics.jsonl")
    table, ok = gpu_check.summary(str(tmp_path))
    assert not ok and "no metrics.jsonl" in table


@pytest.mark.slow
def test_gpu_check_script_dry_run():
    """The whole script without a GPU: tests (gpu-marked, skipped here), kernel rows on the CPU,
    a tiny 2-round training run, one table; exit status 0."""
    env = dict(os.environ, PYTHON=sys.executable, TRITON_INTERPRET="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in ("gpu_tests", "kernels", "train"):
        assert any(line.split()[:2] == [step, "ok"] for line in out.splitlines()), out
    assert "Z equals host passes" in out and "training round" in out


def test_gpu_check_script_refuses_without_a_gpu():
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True,
                          text=True, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_gpu_check_script_help(flag):
    """--help is an answer, not an error: usage and the script's description on stdout, status 0."""
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), flag],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: bash benchmarks/gpu_check.sh")
    assert "--dry-run" in proc.stdout and "Exit status 0" in proc.stdout
