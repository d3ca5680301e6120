"""Shared benchmark options, the comparison-row recorder and the GPU marker.

    pytest benchmarks/                         # default sizes: a few minutes on 2 cores
    pytest benchmarks/ --scale large           # larger sizes (or IICS_BENCH_SCALE=large)

Files ``bench_*.py`` are collected (functions ``test_*`` as usual). A benchmark checks its
result against the reference first, then records one comparison row
through the ``compare`` fixture:

    def test_bench_thing(compare, bench_scale):
        n = 2000 if bench_scale == "small" else 20000
        ...
        compare("pairwise eq5", f"N={n}", ours_s, baseline_s, peak_mb=ours_peak, baseline="IICS row loop")

All rows are printed as one table at the end of the session and written to
``.benchmarks/results.json`` (where pytest-benchmark keeps its own records) for
``benchmarks/readme_table.py``. ``@pytest.mark.gpu`` skips a benchmark without CUDA.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SCALES = ("small", "large")
RESULTS = Path(__file__).resolve().parent.parent / ".benchmarks" / "results.json"
_rows: list[dict] = []


def pytest_collect_file(file_path, parent):
    """Collect benchmarks/bench_*.py (pytest's default pattern is test_*.py)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_addoption(parser):
    parser.addoption(
        "--scale", choices=SCALES, default=None,
        help="benchmark sizes: small (default, a few minutes) or large; env IICS_BENCH_SCALE",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    scale = config.getoption("--scale", default=None)
    if scale:  # benchmark files may read the environment variable directly
        os.environ["IICS_BENCH_SCALE"] = scale


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_scale(request) -> str:
    """'small' or 'large', from --scale, else IICS_BENCH_SCALE, else 'small'."""
    scale = request.config.getoption("--scale") or os.environ.get("IICS_BENCH_SCALE", "small")
    if scale not in SCALES:
        raise pytest.UsageError(f"IICS_BENCH_SCALE must be one of {SCALES}, got {scale!r}")
    return scale


@pytest.fixture
def compare(request, bench_scale):
    """Record one comparison row: compare(op, size, ours_s, baseline_s, peak_mb=None,
    baseline_peak_mb=None, baseline="what the baseline is", note="")."""

    def record(op, size, ours_s, baseline_s, peak_mb=None, baseline_peak_mb=None, baseline="", note=""):
        ratio = baseline_s / ours_s if ours_s and baseline_s else None
        row = {
            "op": op, "size": str(size), "ours_s": ours_s, "baseline_s": baseline_s, "ratio": ratio,
            "peak_mb": peak_mb, "baseline_peak_mb": baseline_peak_mb, "baseline": baseline, "note": note,
            "scale": bench_scale, "test": request.node.nodeid,
            "command": f"pytest {request.node.nodeid}" + (" --scale large" if bench_scale == "large" else ""),
        }
        _rows.append(row)
        print("\n" + _format([row], header=False))
        return row

    return record


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _format(rows, header=True):
    lines = []
    if header:
        lines.append(f"{'op':28s} {'size':>18s} {'ours s':>10s} {'baseline s':>11s} {'ratio':>8s} {'peak MB':>9s} {'base MB':>9s}  baseline")
    for r in rows:
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "-"
        lines.append(
            f"{r['op'][:28]:28s} {r['size'][:18]:>18s} {_fmt(r['ours_s'], '10.4f')} {_fmt(r['baseline_s'], '11.4f')} "
            f"{ratio:>8s} {_fmt(r['peak_mb'], '9.0f')} {_fmt(r['baseline_peak_mb'], '9.0f')}  {r['baseline']}"
        )
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    terminalreporter.section("iics_fast comparisons (baseline measured in the same run)")
    terminalreporter.write_line(_format(_rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from benchmarks.profile import machine_info

    with open(RESULTS, "w") as f:
        json.dump({"machine": machine_info(), "rows": _rows}, f, indent=1)
    terminalreporter.write_line(f"written to {RESULTS}")
