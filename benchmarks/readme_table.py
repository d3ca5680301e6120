"""Markdown performance tables for the README from the benchmark and profiler records.

    pytest benchmarks/                              # writes .benchmarks/results.json
    python -m benchmarks.profile --scale msmt17      # writes profile_out/profile_msmt17.json
    python benchmarks/readme_table.py               # prints the tables

Every row carries the command that produced it and its ratio to the baseline measured in the
same run; figures of the reference extrapolated beyond the sizes it was run at are marked so.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASE_LABELS = {
    "intra": "intra-camera clustering",
    "similarity": "inter-camera similarity (Eq. 5)",
    "rerank": "k-reciprocal re-ranking",
    "merge": "inter-camera merge (average linkage)",
}


def _t(s):
    if s is None:
        return "-"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms"


def _mb(m):
    if m is None:
        return "-"
    return f"{m / 1024:.2f} GB" if m >= 1024 else f"{m:.0f} MB"


def _ratio(r):
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x"


def machine_line(m):
    parts = [m.get("cpu", "?"), f"{m.get('cores', '?')} cores", f"{m.get('memory_gb', '?')} GB RAM"]
    if "torch" in m:
        parts.append(f"torch {m['torch']}")
    parts.append(f"numpy {m.get('numpy', '?')}")
    return ", ".join(parts)


def benchmark_table(results):
    """Rows of `pytest benchmarks/` (conftest's compare fixture)."""
    lines = [f"Measured on {machine_line(results['machine'])}.", "",
             "| operation | size | iics_fast | baseline | speed-up | peak memory (ours / baseline) | command |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results["rows"]:
        ratio = f"{r['ratio']:.1f}x" if r.get("ratio") else "-"
        base = f"{_t(r['baseline_s'])} ({r['baseline']})" if r.get("baseline") else _t(r["baseline_s"])
        lines.append(f"| {r['op']} | {r['size']} | {_t(r['ours_s'])} | {base} | {ratio} | "
                     f"{_mb(r.get('peak_mb'))} / {_mb(r.get('baseline_peak_mb'))} | `{r['command']}` |")
    return "\n".join(lines)


def profile_table(rec):
    """Per-phase rows of one `python -m benchmarks.profile` record."""
    at = rec["reference"]["at_target"]
    lines = [f"`{rec['command']}` — N = {rec['N']:,}, C = {rec['C']}, D = {rec['D']:,}, "
             f"k_inter = {rec['k_inter']}; measured on {machine_line(rec['machine'])}.", "",
             "| phase | iics_fast time | iics_fast peak RSS (+ phase) | reference time | reference + phase memory | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in rec["phases"]:
        if p["name"] not in PHASE_LABELS:
            continue
        label = PHASE_LABELS[p["name"]]
        if p.get("status", "ok") != "ok":  # records written before every phase always ran
            lines.append(f"| {label} | not run ({p['note']}) | | | | |")
            continue
        ref = at.get(p["name"])
        if ref:
            mark = " (extrapolated)" if ref["extrapolated"] else ""
            speed = _ratio(ref["time_s"] / p["time_s"]) if p["time_s"] > 0 else "-"
            lines.append(f"| {label} | {_t(p['time_s'])} | {_mb(p['peak_mb'])} (+{_mb(p['delta_mb'])}) | "
                         f"{_t(ref['time_s'])}{mark} | {_mb(ref['delta_mb'])}{mark} | {speed} |")
        else:
            lines.append(f"| {label} | {_t(p['time_s'])} | {_mb(p['peak_mb'])} (+{_mb(p['delta_mb'])}) | - | - | - |")
    tot = rec["totals"]
    if tot.get("reference_time_s") and tot["ours_time_s"] > 0:
        mark = " (extrapolated)" if tot.get("reference_extrapolated") else ""
        lines.append(f"| **round (these four phases)** | **{_t(tot['ours_time_s'])}** | **{_mb(tot['ours_peak_mb'])}** | "
                     f"**{_t(tot['reference_time_s'])}**{mark} | {_mb(tot['reference_peak_delta_mb'])}{mark} | "
                     f"**{_ratio(tot['reference_time_s'] / tot['ours_time_s'])}** |")
    measured = rec["reference"]["measured"]
    if measured:
        sizes = ", ".join(f"{m['N']:,}" for m in measured)
        fits = "; ".join(f"{ph} time ~ N^{v['time_exponent']:.2f}, memory ~ N^{v['memory_exponent']:.2f}"
                         for ph, v in rec["reference"]["fit"].items())
        lines += ["", f"Reference measured at N = {sizes} (Jaccard row loop timed on {rec['reference']['rows_timed']} rows"
                  f" and scaled){'; growth fitted on the largest: ' + fits if fits else ''}."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(ROOT, ".benchmarks", "results.json"))
    parser.add_argument("--profiles", nargs="*", help="profile JSON records (default profile_out/profile_*.json)")
    args = parser.parse_args(argv)
    out = []
    for path in args.profiles if args.profiles is not None else sorted(glob.glob(os.path.join(ROOT, "profile_out", "profile_*.json"))):
        with open(path) as f:
            out.append(profile_table(json.load(f)))
    if os.path.exists(args.results):
        with open(args.results) as f:
            out.append(benchmark_table(json.load(f)))
    if not out:
        parser.error("no records found: run `pytest benchmarks/` and/or `python -m benchmarks.profile` first")
    text = "\n\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
