"""Side-by-side benchmarks: ours and the peers a user would pick, at equal work, in one run.

    pytest benchmarks/                          # default sizes: minutes on 2 cores
    IICS_BENCH_SCALE=large pytest benchmarks/   # + MSMT17-scale cases (or --scale large)
    python benchmarks/report.py                 # docs/performance.md from the records

Files ``bench_*.py`` are collected. A benchmark checks its result against the reference first,
then calls the ``side_by_side`` fixture, which times ours through pytest-benchmark's
``benchmark`` fixture (its statistics, ``--benchmark-json``, ``--benchmark-compare``) and runs
every peer in the same rounds, interleaved with ours (the peer's run is the round's untimed
``setup`` for pytest-benchmark, timed here), so load on a shared machine falls on both sides
alike. Peers too slow for several rounds run in the first round only. Peak resident memory of
each side is measured in a fresh subprocess (``memory_probe``), never computed.

Each comparison writes one machine- and commit-tagged JSON record under
``benchmarks/results/<machine>/`` (committed: the README's figures come from these records
through ``benchmarks/report.py``), with the load average before and after, every round's time,
the medians, the ratio per round, the peak memory and, where the operation has one, this
machine's ceiling for its inner loop. ``@pytest.mark.gpu`` skips without CUDA;
``@pytest.mark.large`` runs only with IICS_BENCH_SCALE=large (the MSMT17-scale cases).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.probes import PeakMemory, machine_info

SCALES = ("small", "large")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MEMORY_DRIVER = """
import importlib.util, json, sys, time
from benchmarks.probes import PeakMemory
spec = importlib.util.spec_from_file_location("bench_module", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules["bench_module"] = mod
spec.loader.exec_module(mod)
run = mod.build(sys.argv[2], **json.loads(sys.argv[3]))  # inputs built (and libraries warmed) here
t0 = time.perf_counter()
with PeakMemory() as mem:
    run()
print(json.dumps({"peak_mb": mem.grew_mib, "input_mb": mem.start_kib / 1024,
                  "time_s": time.perf_counter() - t0, "sampled": mem.sampled}))
"""


def pytest_collect_file(file_path, parent):
    """Collect benchmarks/bench_*.py (pytest's default pattern is test_*.py)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_addoption(parser):
    parser.addoption("--scale", choices=SCALES, default=None,
                     help="small (default) or large (adds the MSMT17-scale cases); env IICS_BENCH_SCALE")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "large: MSMT17-scale case, runs only with IICS_BENCH_SCALE=large")
    scale = config.getoption("--scale", default=None)
    if scale:
        os.environ["IICS_BENCH_SCALE"] = scale


def bench_scale() -> str:
    scale = os.environ.get("IICS_BENCH_SCALE", "small")
    if scale not in SCALES:
        raise pytest.UsageError(f"IICS_BENCH_SCALE must be one of {SCALES}, got {scale!r}")
    return scale


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    large = bench_scale() == "large"
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (none found)"))
        if "large" in item.keywords and not large:
            item.add_marker(pytest.mark.skip(reason="MSMT17 scale: set IICS_BENCH_SCALE=large"))


# ----------------------------------------------------------------------------- machine, commit


def machine_tag(info: dict) -> str:
    """Folder name of a machine's records: CPU name, family and model numbers (one name covers
    several generations) and core count."""
    slug = re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-")
    if info.get("cpu_family") is not None:
        slug += f"-f{info['cpu_family']}m{info.get('cpu_model')}"
    return f"{slug}-{info['cores']}c"


def commit_info() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    return {"id": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            # the records this run writes are not a change to what is measured
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                              ":(exclude)benchmarks/results"))}


# ----------------------------------------------------------------------------- memory


def memory_probe(module_file: str, impl: str, **size) -> dict:
    """Peak resident memory of one implementation in a fresh process.

    The module's ``build(impl, **size)`` makes the inputs, warms the libraries up on a tiny
    case and returns a callable, which then runs once under ``benchmarks.probes.PeakMemory``:
    the peak above the resident size at its start is what the implementation itself needs.
    Returns {"peak_mb", "input_mb", "time_s", "sampled", "how"}; {"error": ...} when it failed.
    """
    from benchmarks.probes import run_python

    try:
        out = run_python(MEMORY_DRIVER, module_file, impl, json.dumps(size))
    except RuntimeError as exc:
        return {"error": str(exc).strip().splitlines()[-1][:300]}
    return {**json.loads(out.strip().splitlines()[-1]), "how": "in a fresh process (memory_probe)"}


# ----------------------------------------------------------------------------- side by side


def _stats(times):
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "rounds": len(times), "times_s": times}


def _slug(text):
    return re.sub(r"[^A-Za-z0-9=.,]+", "_", text).strip("_")


@pytest.fixture
def side_by_side(benchmark, request):
    """run(op, size, ours, peers, ...) -> the record written; see the module docstring.

    ours: callable; peers: {label: callable | (callable, rounds) | (callable, rounds, prepare)};
    prepare: callable returning the positional arguments of one run (fresh inputs for in-place
    operations; its time is not counted), else the callables take none; a peer's own prepare
    gives it its inputs in its own form; rounds: rounds of ours; memory:
    {label: dict(module_file=..., impl=..., **size)} for memory_probe ("ours" for ours);
    ceiling: {"work": units of work of one run, "unit": name, "rate": units/s this machine can
    do, "rate_per_core": the same for one core, "how": how it was measured}; memory_inline: our
    peak measured in this process around each timed run (VmHWM reset first), for the largest
    cases where a second run in a fresh process would double hours of work; extra: anything else to keep in the record.
    """

    def run(op, size, ours, peers, *, prepare=None, rounds=3, memory=None, ceiling=None, extra=None,
            ours_label="iics_fast", memory_inline=False):
        load_before = os.getloadavg()
        peer_fns = {k: (v if isinstance(v, tuple) else (v,)) for k, v in peers.items()}
        peer_fns = {k: (v[0], v[1] if len(v) > 1 else rounds, v[2] if len(v) > 2 else prepare)
                    for k, v in peer_fns.items()}
        peer_times = {k: [] for k in peer_fns}
        peer_cpu = {k: [] for k in peer_fns}
        ours_cpu = []
        round_no = [0]

        def setup():
            for label, (fn, n_rounds, prep) in peer_fns.items():
                if round_no[0] < n_rounds:
                    args = prep() if prep else ()
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn(*args)
                    peer_times[label].append(time.perf_counter() - t0)
                    peer_cpu[label].append(time.process_time() - c0)
            round_no[0] += 1
            return (prepare() if prepare else ()), {}

        inline = []

        def timed_ours(*args):  # CPU seconds (all threads) beside pytest-benchmark's wall time
            mem = PeakMemory() if memory_inline else contextlib.nullcontext()
            with mem:
                c0 = time.process_time()
                out = ours(*args)
                ours_cpu.append(time.process_time() - c0)
            if memory_inline:
                inline.append(mem.grew_mib)
            return out

        benchmark.group = f"{op} {size}"
        benchmark.extra_info.update({"op": op, "size": size})
        benchmark.pedantic(timed_ours, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
        ours_times = list(benchmark.stats.stats.data)
        record = {
            "op": op, "size": size, "test": request.node.nodeid,
            "command": f"{'IICS_BENCH_SCALE=large ' if bench_scale() == 'large' else ''}pytest '{request.node.nodeid}'",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_info(), "commit": commit_info(),
            "load_average": {"before": load_before, "after": os.getloadavg()},
            "ours": {"label": ours_label, **_stats(ours_times), "cpu_s": ours_cpu}, "peers": [],
        }
        med = statistics.median(ours_times)
        for label, times in peer_times.items():
            pairs = [p / o for p, o in zip(times, ours_times)]
            record["peers"].append({"label": label, **_stats(times), "cpu_s": peer_cpu[label],
                                    "ratio": statistics.median(times) / med,
                                    "ratio_per_round": pairs})
        if memory:
            record["memory"] = {label: memory_probe(**spec) for label, spec in memory.items()}
        if inline:
            record.setdefault("memory", {})["ours"] = {
                "peak_mb": max(inline), "how": "in this process, around the timed run (benchmarks.probes.PeakMemory)"}
        if ceiling:
            ceil = dict(ceiling)
            ceil["ours_rate"] = ceil["work"] / min(ours_times)
            ceil["fraction"] = ceil["ours_rate"] / ceil["rate"]
            if ceil.get("rate_per_core"):  # robust to load: work per CPU-second against one core
                ceil["fraction_cpu"] = ceil["work"] / min(ours_cpu) / ceil["rate_per_core"]
            for p in record["peers"]:
                p["ceiling_fraction"] = ceil["work"] / p["min_s"] / ceil["rate"]
            record["ceiling"] = ceil
        if extra:
            record.update(extra)
        benchmark.extra_info["peers"] = {p["label"]: p["median_s"] for p in record["peers"]}
        out = RESULTS / machine_tag(record["machine"]) / f"{_slug(op)}__{_slug(size)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(out)  # atomic: a killed run never leaves half a record
        print(f"\n{op} {size}: ours {med:.4g} s" + "".join(
            f"; {p['label']} {p['median_s']:.4g} s ({p['ratio']:.2f}x)" for p in record["peers"])
            + (f"; ceiling fraction {record['ceiling']['fraction']:.2f}" if ceiling else "")
            + f"; load {load_before[0]:.1f} -> {record['load_average']['after'][0]:.1f}"
            + f"  [{out.relative_to(HERE.parent)}]")
        return record

    return run
