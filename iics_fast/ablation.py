"""The ablation as one command: `python -m iics_fast.ablation --seeds 3 --out DIR`.

Trains every setting with every seed (the paper's Table 1 rows, the supervised upper bound and
the other similarity of the clustering), then writes

    DIR/ablation.md    mean and spread over seeds of the final mAP, rank-1, the last round's
                       inter-camera pseudo-label ARI and the starting mAP, per setting
    DIR/ablation.png   mAP per round (round 0: before training), mean and min-max band
    DIR/results.json   every run's numbers
    DIR/runs/<setting>-seed<N>/   each run's folder (as `python -m iics_fast.train` writes)

Any further arguments go to every run (e.g. `--dataset market1501 --root DATA`); the default
is the synthetic demo preset. A killed ablation resumes: finished runs are read back, a run
with a checkpoint continues from it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from .checkpoint import write_atomic

#: setting -> its arguments of `python -m iics_fast.train` (in table order)
SETTINGS = {
    "stage 1 only": ["--stages", "intra"],
    "+ stage 2 on features": ["--inter-similarity", "feature"],
    "+ stage 2 on J (Eq. 9)": ["--inter-similarity", "jaccard"],
    "+ stage 2 on Eq. 5 (IICS)": [],
    "IICS, other similarity": None,  # filled in by `settings()`: the preset's other choice
    "supervised (upper bound)": ["--supervised"],
}


def settings(extra: list[str]) -> dict:
    """SETTINGS with the similarity pair resolved against the run's own choice."""
    from . import train

    config = train.resolve(train.parse_args(list(extra)))
    other = "rerank" if config["similarity"] == "cosine" else "cosine"
    out = {}
    for name, argv in SETTINGS.items():
        if argv is None:
            name, argv = f"IICS, {other} (preset: {config['similarity']})", ["--similarity", other]
        out[name] = argv
    return out


def slug(name: str) -> str:
    """A folder name for a setting: its words joined by '-'."""
    return "-".join(re.findall(r"[a-z0-9]+", name.lower()))


def run_one(argv: list[str], out: str) -> dict:
    """One training run in this process (resumed when its folder holds a checkpoint);
    returns its per-round metrics and the evaluation before training."""
    import torch

    from . import train

    done = os.path.join(out, "done.json")
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as fh:
            return json.load(fh)
    resume = os.path.isfile(os.path.join(out, "last.pt"))
    metrics = train.main(argv + ["--out", out] + (["--resume"] if resume else []))
    state = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=False)
    result = {"metrics": metrics, "initial": state["initial_eval"]}
    write_atomic(done, json.dumps(result) + "\n")
    return result


def _curve(result: dict) -> list[tuple[int, float]]:
    pts = [(0, result["initial"]["mAP"])] if result["initial"] else []
    return pts + [(row["round"] + 1, row["eval"]["mAP"]) for row in result["metrics"]
                  if "eval" in row]


def summarise(results: dict) -> list[dict]:
    """Per setting: mean, sample std, min and max over seeds of the final numbers."""
    rows = []
    for name, runs in results.items():
        def stat(values):
            v = np.array([x for x in values if x is not None and np.isfinite(x)], float)
            if len(v) == 0:
                return None
            return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "min": float(v.min()), "max": float(v.max())}
        last = [next((row["eval"] for row in reversed(r["metrics"]) if "eval" in row), None)
                for r in runs]
        ari = [next((row["inter_quality"]["ari"] for row in reversed(r["metrics"])
                     if "inter_quality" in row), None) for r in runs]
        rows.append({"setting": name, "runs": len(runs),
                     "mAP": stat([e["mAP"] for e in last if e]),
                     "rank1": stat([e["rank1"] for e in last if e]),
                     "ari": stat(ari),
                     "start_mAP": stat([r["initial"]["mAP"] for r in runs if r["initial"]])})
    return rows


def markdown(rows: list[dict], note: str = "") -> str:
    def pct(s):
        return "-" if s is None else (f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} "
                                      f"[{100 * s['min']:.1f}, {100 * s['max']:.1f}]")

    def num(s):
        return "-" if s is None else (f"{s['mean']:.3f} ± {s['std']:.3f} "
                                      f"[{s['min']:.3f}, {s['max']:.3f}]")

    lines = ["| setting | seeds | mAP % | rank-1 % | inter ARI (last round) | mAP % at start |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['runs']} | {pct(r['mAP'])} | {pct(r['rank1'])} | "
                     f"{num(r['ari'])} | {pct(r['start_mAP'])} |")
    lines.append("")
    lines.append("mean ± sample standard deviation [min, max] over the seeds; mAP and rank-1 "
                 "after the last round.")
    if note:
        lines.append(note)
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    """mAP per round per setting: the mean over seeds with a min-max band."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in results.items():
        curves = [dict(_curve(r)) for r in runs]
        rounds = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not rounds:
            continue
        v = 100 * np.array([[c[x] for x in rounds] for c in curves])
        line, = ax.plot(rounds, v.mean(0), "o-", label=name, markersize=3)
        ax.fill_between(rounds, v.min(0), v.max(0), color=line.get_color(), alpha=0.15)
    ax.set(xlabel="round (0 = before training)", ylabel="mAP %",
           title=f"mAP per round, mean and min-max over {max(len(r) for r in results.values())} "
                 f"seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m iics_fast.ablation", description=__doc__,
                                allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N of every setting [3]")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at the same time, each in its own process [1]")
    p.add_argument("--only", action="append", default=None,
                   help="run only the settings whose name contains this text (repeatable)")
    args, extra = p.parse_known_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        raise ValueError("--seeds and --jobs must be >= 1")
    if any(a in ("--out", "--seed", "--resume") for a in extra):
        raise ValueError("--out, --seed and --resume are set by the ablation per run; "
                         "remove them from the extra arguments")
    chosen = {k: v for k, v in settings(extra).items()
              if not args.only or any(s in k for s in args.only)}
    if not chosen:
        raise ValueError(f"--only {args.only} matches no setting of {list(settings(extra))}")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:  # a file of that name or on its path, no permission
        raise ValueError(f"--out {args.out!r}: cannot make the output folder ({exc.strerror}); "
                         f"give a folder, not a file, where you can write") from None
    jobs = [(name, seed, extra + argv_s + ["--seed", str(seed), "--no-progress",
                                          "--no-verbose"],
             os.path.join(args.out, "runs", f"{slug(name)}-seed{seed}"))
            for name, argv_s in chosen.items() for seed in range(1, args.seeds + 1)]
    results = {name: [] for name in chosen}
    if args.jobs == 1:
        done = [run_one(a, o) for _, _, a, o in jobs]
    else:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            done = list(ex.map(run_one, [a for _, _, a, _ in jobs], [o for *_, o in jobs]))
    for (name, *_), result in zip(jobs, done):
        results[name].append(result)
    rows = summarise(results)
    table = markdown(rows, f"command: python -m iics_fast.ablation "
                           f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    write_atomic(os.path.join(args.out, "ablation.md"), table)
    write_atomic(os.path.join(args.out, "results.json"),
                 json.dumps({"rows": rows, "results": results}) + "\n")
    plot(results, os.path.join(args.out, "ablation.png"))
    print(table)
    return {"rows": rows, "results": results}


if __name__ == "__main__":
    from .cli import run

    run(main)
