"""Profile one IICS clustering round at dataset scale, beside the reference pipeline.

    python -m benchmarks.profile --scale msmt17          # N=32,621, C=15, D=9,000, k_inter=1,200
    python -m benchmarks.profile --scale market1501      # N=12,936, C=6
    python -m benchmarks.profile --scale 2000            # any N (C=6 unless --cameras)

The round runs on synthetic data of the real shapes: identities seen by several cameras with a
per-camera offset (L2-normalised, d=2048), and per-camera softmax scores from a simulated
stage-1 classifier (one head a camera over that camera's intra-camera clusters, peaked
softmaxes; D = sum of the heads' sizes = C x 600 at dataset scale). Phases:

    extract (simulated) -> intra-camera clustering (per camera) -> scores (simulated)
    -> inter-camera similarity (fused Eq. 5, condensed) -> re-ranking (condensed, in place)
    -> merge (average linkage, in place, k_inter clusters)

The clustering phases are `iics_fast.pipeline`'s functions with the trainer's default settings
(re-ranking on or off as `python -m iics_fast.train` runs by default), so what is timed is what a
default training round runs. Run it from the repository root.

Each phase reports wall time and peak resident memory (VmHWM, reset per phase through
/proc/self/clear_refs; a sampling thread where that is unavailable). The same phases of the
reference pipeline (benchmarks/reference.py) run at sizes whose dense N x N matrices fit the memory
cap (--reference-max-gb); their growth exponents (log-log slope of time and memory against N)
extrapolate them to the target N, and every extrapolated figure is labelled so. The reference's
Jaccard row loop, whose cost per row is constant, is timed on --reference-rows rows and scaled.
Growth is fitted on the three largest sizes measured; an extrapolated memory figure is never
below the dense N x N arrays the reference phase is known to hold (DENSE_BYTES_PER_N2).

Output under --out: profile_<scale>.json and profile_<scale>.png, and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from benchmarks.probes import PeakMemory, machine_info
from iics_fast import pipeline, rundir

#: name -> (images N, cameras C, inter-camera clusters k_inter)
SCALES = {
    "market1501": (12936, 6, 800),
    "dukemtmc": (16522, 8, 800),
    "msmt17": (32621, 15, 1200),
}
FEATURE_DIM = 2048
K_INTRA = 600
MU = 0.02  # mu_0: the weight of the Jaccard term in round 0
PHASES = ("extract", "intra", "scores", "similarity", "rerank", "merge")
SIMULATED = ("extract", "scores")  # stand-ins for the network: timed, never compared
COMPARED = ("intra", "similarity", "rerank", "merge")


# --------------------------------------------------------------------------- memory metering
@dataclass
class PhaseResult:
    name: str
    time_s: float
    peak_mb: float  # process peak RSS during the phase
    delta_mb: float  # peak RSS above the RSS at the phase's start: what the phase itself needs
    note: str = ""
    cpu_s: float = None  # CPU time of the process's threads: the work, less the load's share


@contextmanager
def meter(name: str, results: list, note: str = ""):
    """Time a block and record its peak RSS into `results` as a PhaseResult (PeakMemory first
    releases the free heap, so a phase cannot reuse pages an earlier phase left resident)."""
    with PeakMemory() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    results.append(PhaseResult(name, elapsed, mem.peak_mib, mem.grew_mib, note=note, cpu_s=cpu))


# --------------------------------------------------------------------------- synthetic round
def synthetic_features(n: int, cameras: int, seed: int = 0, dim: int = FEATURE_DIM):
    """Features of `n` images: identities (about 16 images each) seen by 2..C cameras.

    feature = identity centre + camera offset + noise, L2-normalised, float32 (n, dim). Every
    camera gets at least one image when n >= cameras. Returns (features, camids, identities).
    """
    if n < 1 or cameras < 1:
        raise ValueError(f"need n >= 1 and cameras >= 1, got n={n}, cameras={cameras}")
    rng = np.random.default_rng(seed)
    n_ids = max(1, n // 16)
    ids = rng.integers(0, n_ids, n)
    ids[: min(n, n_ids)] = np.arange(min(n, n_ids))
    visits = [rng.choice(cameras, size=min(cameras, rng.integers(2, 6)), replace=False) for _ in range(n_ids)]
    camids = np.array([visits[i][rng.integers(len(visits[i]))] for i in ids], dtype=np.int64)
    camids[: min(n, cameras)] = np.arange(min(n, cameras))
    centres = rng.standard_normal((n_ids, dim), dtype=np.float32) / np.sqrt(dim)
    offsets = 0.6 * rng.standard_normal((cameras, dim), dtype=np.float32) / np.sqrt(dim)
    feats = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 4096):  # bounded temporaries
        sl = slice(start, min(n, start + 4096))
        noise = rng.standard_normal((sl.stop - sl.start, dim), dtype=np.float32) * np.float32(0.7 / np.sqrt(dim))
        feats[sl] = centres[ids[sl]] + offsets[camids[sl]] + noise
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats, camids, ids


def synthetic_scores(features, camids, heads, temperature: float = 30.0):
    """Per-camera softmax scores: camera c's head holds unit prototypes (k_c, d); logits are
    temperature x cosine, softmaxed per head and concatenated: float32 (n, sum k_c)."""
    n = features.shape[0]
    dims = [h.shape[0] for h in heads]
    out = np.empty((n, sum(dims)), dtype=np.float32)
    col = 0
    for w in heads:
        for start in range(0, n, 8192):
            sl = slice(start, min(n, start + 8192))
            z = temperature * (features[sl] @ w.T)
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
            out[sl, col : col + w.shape[0]] = z
        col += w.shape[0]
    return out


def heads_from_labels(features, camids, labels):
    """One head a camera: the normalised mean feature of each of its intra-camera clusters."""
    heads = []
    for cam in np.unique(camids):
        idx = np.flatnonzero(camids == cam)
        lab = np.unique(labels[idx], return_inverse=True)[1]
        w = np.zeros((lab.max() + 1, features.shape[1]), dtype=np.float32)
        np.add.at(w, lab, features[idx])
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        heads.append(w)
    return heads


def heads_from_samples(features, camids, k_intra=K_INTRA, seed=0):
    """One head a camera of pipeline.cluster_count(n_c) prototypes drawn from that camera's images
    (with replacement where it has fewer): the scores' shape without running the clustering."""
    rng = np.random.default_rng(seed)
    heads = []
    for cam in np.unique(camids):
        idx = np.flatnonzero(camids == cam)
        k = pipeline.cluster_count(len(idx), k_intra)
        heads.append(features[rng.choice(idx, size=k, replace=len(idx) < k)])
    return heads


def run_ours(n, cameras, k_inter, seed=0, k_intra=K_INTRA, log=print):
    """One round through `iics_fast.pipeline`, called as the trainer calls it with its default
    settings (`train.DEFAULTS`): returns (PhaseResults, info dict). The merge is timed apart
    from the re-ranking: `cluster_distance` is exactly `rerank_distance` then `merge`."""
    rerank, _ = _trainer_settings()
    res: list[PhaseResult] = []
    with meter("extract", res, "simulated: synthetic features"):
        feats, camids, _ = synthetic_features(n, cameras, seed)
        feats = torch.from_numpy(feats)
    log(f"  extract (simulated)   {res[-1].time_s:8.2f} s")
    how = "re-ranked" if rerank else "cosine"
    with meter("intra", res, f"per camera: {how} + average linkage into {k_intra}"):
        labels = pipeline.intra_camera_labels(feats, camids, k_intra, rerank=rerank)
    log(f"  intra                 {res[-1].time_s:8.2f} s")
    with meter("scores", res, "simulated: per-camera softmax heads over the intra clusters"):
        scores = synthetic_scores(feats.numpy(), camids, heads_from_labels(feats.numpy(), camids, labels))
        scores = torch.from_numpy(scores)
    log(f"  scores (simulated)    {res[-1].time_s:8.2f} s   D = {scores.shape[1]}")
    info = {"D": int(scores.shape[1])}
    with meter("similarity", res, "fused Eq. 5, condensed"):
        dist = pipeline.inter_camera_distance(feats, scores, camids, MU).numpy()
    log(f"  similarity            {res[-1].time_s:8.2f} s")
    del scores
    with meter("rerank", res, "k-reciprocal, condensed in place" if rerank else "off (the trainer's default)"):
        pipeline.rerank_distance(dist, rerank)
    log(f"  rerank                {res[-1].time_s:8.2f} s")
    with meter("merge", res, f"average linkage in place into {k_inter}"):
        final = pipeline.merge(dist, k_inter)
    log(f"  merge                 {res[-1].time_s:8.2f} s   clusters = {len(np.unique(final))}")
    return res, info


def _trainer_settings():
    """(rerank parameters or None, k_intra) of a default training run."""
    from iics_fast.train import DEFAULTS

    rerank = None
    if DEFAULTS["similarity"][0] == "rerank":
        rerank = {"k1": DEFAULTS["rerank_k1"][0], "k2": DEFAULTS["rerank_k2"][0],
                  "lambda_value": DEFAULTS["rerank_lambda"][0]}
    return rerank, DEFAULTS["k_intra"][0]


# --------------------------------------------------------------------------- reference pipeline
#: bytes per N^2 of the dense arrays each reference phase holds at its peak, counted from the
#: code (benchmarks/reference.py): similarity = distance + Jaccard (float32) + tiled camera ids
#: (int64) + mask + two product temporaries (float32); rerank = shifted and normalised copies
#: (float32) + V (float16) + the int64 argsort and its int32 copy; merge = scikit-learn's two
#: int64 triu_indices arrays + the condensed copy + SciPy's float64 condensed matrix.
DENSE_BYTES_PER_N2 = {"similarity": 28.0, "rerank": 18.0, "merge": 14.0}


def reference_bytes(n: int, d: int) -> float:
    """Estimated peak of the reference's inter-camera phases: its dense arrays, the input
    distance kept alive, and the Jaccard loop's N x D float32 temporaries."""
    return (max(DENSE_BYTES_PER_N2.values()) + 4.0) * n * n + 16.0 * n * d


_warm = False


def _warm_up_reference():
    """Run each reference step once on a tiny input: torch's first call costs ~1 s of set-up
    that would otherwise be scaled up with the timed rows."""
    global _warm
    if _warm:
        return
    _warm = True
    from benchmarks import reference as B

    f, c, _ = synthetic_features(40, 2, 0, dim=16)
    dist = B.reference_inter_camera_distance(f, np.abs(f), c, MU)
    B.reference_cluster(B.reference_rerank(dist, k1=5, k2=2), 4)


def run_reference_inter(n, cameras, d_heads, k_inter, seed=0, rows=16, log=print):
    """The reference's similarity, re-ranking and merge at size n; the Jaccard row loop on
    `rows` rows, scaled to n. Scores have the target's head sizes (`d_heads`, one a camera)."""
    from benchmarks import reference as B

    _warm_up_reference()
    feats, camids, _ = synthetic_features(n, cameras, seed)
    rng = np.random.default_rng(seed + 1)
    heads = [feats[rng.choice(np.flatnonzero(camids == c), size=k, replace=True)] for c, k in enumerate(d_heads)]
    scores = synthetic_scores(feats, camids, heads)
    res: list[PhaseResult] = []
    rows = min(rows, n)
    with meter("similarity", res, f"row loop timed on {rows} of {n} rows, scaled"):
        t0 = time.perf_counter()
        dist = B.reference_cosine_distance(feats)
        cos_s = time.perf_counter() - t0
        loop_s = float("inf")
        for shift in (0, 1):  # best of two row sets: one-off stalls on a shared machine are not scaled up
            t1 = time.perf_counter()
            jac = B.reference_jaccard(scores, rows=(np.linspace(0, n - 1, rows).astype(np.int64) + shift) % n)
            loop_s = min(loop_s, time.perf_counter() - t1)
            if shift == 0:
                del jac
        t2 = time.perf_counter()
        B.reference_fuse(dist, jac, camids, MU)
        del jac
        t3 = time.perf_counter()
    res[-1].time_s = cos_s + loop_s * n / rows + (t3 - t2)
    del scores
    with meter("rerank", res):
        dist = B.reference_rerank(dist)
    with meter("merge", res):
        B.reference_cluster(dist, min(k_inter, n))
    del dist
    log(f"  reference N={n:6d}  " + "  ".join(f"{r.name} {r.time_s:7.2f} s {r.delta_mb:7.0f} MB" for r in res))
    return res


def run_reference_intra(n, cameras, seed=0, k_intra=K_INTRA):
    """The reference's intra-camera clustering at the full size (per-camera matrices are small)."""
    from benchmarks import reference as B

    feats, camids, _ = synthetic_features(n, cameras, seed)
    res: list[PhaseResult] = []
    with meter("intra", res, "measured at full size"):
        B.reference_intra_camera(feats, camids, k_intra)
    return res[0]


def fit_power_law(sizes, values):
    """Least-squares fit of log(value) = a log(n) + b; returns (exponent a, prefactor e^b)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    ok = (sizes > 0) & (values > 0) & np.isfinite(values)
    if ok.sum() < 2:
        raise ValueError("need at least two positive measurements to fit a growth exponent")
    a, b = np.polyfit(np.log(sizes[ok]), np.log(values[ok]), 1)
    return float(a), float(np.exp(b))


def default_reference_sizes(n):
    """Sizes for the reference: 1k..8k below n, or n/4, n/2, n for small n."""
    if n <= 1000:
        return sorted({max(8, n // 4), max(16, n // 2), n})
    return [s for s in (1000, 2000, 4000, 8000) if s <= n]


# --------------------------------------------------------------------------- report


def _plot(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_target = record["N"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = dict(zip(COMPARED, ("tab:green", "tab:blue", "tab:orange", "tab:red")))
    for ax, key, label in ((axes[0], "time_s", "wall time (s)"), (axes[1], "delta_mb", "peak memory added (MB)")):
        for phase in COMPARED:
            pts = [(m["N"], m[phase][key]) for m in record["reference"]["measured"] if phase in m]
            fit = record["reference"]["fit"].get(phase)
            c = colors[phase]
            if pts:
                ax.plot(*zip(*pts), "o", color=c, label=f"reference {phase} (measured)")
            if fit and pts:
                a, pref = fit["time_exponent" if key == "time_s" else "memory_exponent"], fit[
                    "time_prefactor" if key == "time_s" else "memory_prefactor"]
                xs = np.geomspace(min(p[0] for p in pts), max(n_target, max(p[0] for p in pts)), 50)
                ax.plot(xs, pref * xs**a, "--", color=c, alpha=0.7, label=f"fit n^{a:.2f} (extrapolated)")
            ref = record["reference"]["at_target"].get(phase)
            if ref:  # the figure the table reports at the target N
                ax.plot([n_target], [ref[key]], "s" if ref["extrapolated"] else "o", color=c, mfc="none", ms=9,
                        label=f"reference {phase} at N={n_target} "
                              f"({'extrapolated' if ref['extrapolated'] else 'measured'})")
            ours = next((p for p in record["phases"] if p["name"] == phase), None)
            if ours:
                ax.plot([n_target], [max(ours[key], 1e-3)], "*", ms=14, color=c, label=f"iics_fast {phase}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("images N")
        ax.set_ylabel(label)
        ax.axvline(n_target, color="gray", lw=0.8)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6, loc="upper left", ncol=2)
    fig.suptitle(f"IICS clustering round, {record['scale']} (N={n_target}, C={record['C']}, D={record['D']})"
                 f" - stars: iics_fast; dots: reference measured; dashed/squares: reference extrapolated", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(record):
    lines = [f"{'phase':22s} {'iics_fast s':>11s} {'peak MB':>9s} {'+MB':>8s} | {'reference s':>12s} "
             f"{'+MB':>9s} {'':4s} {'speed-up':>9s} {'mem ratio':>9s}"]
    at = record["reference"]["at_target"]
    for p in record["phases"]:
        name = p["name"] + (" (simulated)" if p["name"] in SIMULATED else "")
        row = f"{name:22s} {p['time_s']:11.2f} {p['peak_mb']:9.0f} {p['delta_mb']:8.0f} |"
        ref = at.get(p["name"])
        if ref:
            flag = "extr" if ref["extrapolated"] else "meas"
            ratio_t = ref["time_s"] / p["time_s"] if p["time_s"] > 0 else float("inf")
            ratio_m = ref["delta_mb"] / max(p["delta_mb"], 1.0)
            row += f" {ref['time_s']:12.1f} {ref['delta_mb']:9.0f} {flag:4s} {ratio_t:8.1f}x {ratio_m:8.1f}x"
        lines.append(row)
    tot = record["totals"]
    lines.append(f"{'round (compared phases)':22s} {tot['ours_time_s']:11.2f} {tot['ours_peak_mb']:9.0f} {'':8s} |"
                 + (f" {tot['reference_time_s']:12.1f} {tot['reference_peak_delta_mb']:9.0f}"
                    if tot.get("reference_time_s") else ""))
    return "\n".join(lines)


def profile(n, cameras, k_inter, scale_name=None, reference_sizes=None, reference_rows=16,
            reference_max_gb=8.0, reference=True, seed=0, out="profile_out", log=print):
    """Run the round and the reference, write JSON + PNG under `out`, return the record."""
    scale_name = scale_name or str(n)
    from iics_fast import condensed, memory
    # before any work: the condensed N x N distance beside the features and scores
    memory.require(4 * condensed.size(n) + 4 * n * (2 * FEATURE_DIM + cameras * K_INTRA),
                   f"profiling one round at N = {n}",
                   way_out="profile a smaller N (--scale 2000) or on a machine with more memory")
    log(f"iics_fast round at {scale_name}: N={n}, C={cameras}, k_intra={K_INTRA}, k_inter={k_inter}")
    ours, info = run_ours(n, cameras, k_inter, seed, log=log)
    feats, camids, _ = synthetic_features(n, cameras, seed)
    d_heads = [pipeline.cluster_count(int((camids == c).sum()), K_INTRA) for c in range(cameras)]
    del feats
    d = info["D"]
    record = {"scale": scale_name, "N": n, "C": cameras, "D": d, "k_intra": K_INTRA, "k_inter": k_inter,
              "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
              "command": "python -m benchmarks.profile " + " ".join(sys.argv[1:]),
              "phases": [asdict(p) for p in ours],
              "reference": {"measured": [], "fit": {}, "at_target": {}, "rows_timed": reference_rows}}
    if reference:
        sizes = reference_sizes or default_reference_sizes(n)
        cap = reference_max_gb * 2**30
        skipped = [s for s in sizes if reference_bytes(s, d) > cap]
        sizes = [s for s in sizes if reference_bytes(s, d) <= cap]
        if skipped:
            log(f"  reference skipped at N={skipped}: estimated > {reference_max_gb} GB")
        for s in sizes:
            phases = run_reference_inter(s, cameras, d_heads, k_inter, seed, reference_rows, log=log)
            record["reference"]["measured"].append({"N": s, **{p.name: asdict(p) for p in phases}})
        intra = run_reference_intra(n, cameras, seed)
        log(f"  reference intra at N={n}: {intra.time_s:.2f} s, {intra.delta_mb:.0f} MB (measured)")
        record["reference"]["at_target"]["intra"] = {"time_s": intra.time_s, "delta_mb": intra.delta_mb,
                                                     "extrapolated": False}
        measured = record["reference"]["measured"]
        for phase in ("similarity", "rerank", "merge"):
            ns = [m["N"] for m in measured]
            ts = [m[phase]["time_s"] for m in measured]
            ms = [m[phase]["delta_mb"] for m in measured]
            if n in ns:
                i = ns.index(n)
                record["reference"]["at_target"][phase] = {"time_s": ts[i], "delta_mb": ms[i], "extrapolated": False}
            if len(ns) >= 2 and n not in ns:
                try:  # the largest sizes: nearest the asymptotic growth
                    ta, tp = fit_power_law(ns[-3:], ts[-3:])
                    ma, mp = fit_power_law(ns[-3:], ms[-3:])
                except ValueError as exc:  # e.g. memory deltas lost in allocator noise at tiny N
                    log(f"  no growth fit for reference {phase}: {exc}")
                    continue
                record["reference"]["fit"][phase] = {"time_exponent": ta, "time_prefactor": tp,
                                                     "memory_exponent": ma, "memory_prefactor": mp}
                floor_mb = DENSE_BYTES_PER_N2[phase] * n * n / 2**20
                record["reference"]["at_target"][phase] = {
                    "time_s": tp * n**ta, "delta_mb": max(mp * n**ma, floor_mb), "extrapolated": True,
                    "fit_delta_mb": mp * n**ma, "dense_floor_mb": floor_mb}
    totals = {"ours_time_s": sum(p.time_s for p in ours if p.name in COMPARED),
              "ours_peak_mb": max(p.peak_mb for p in ours)}
    at = record["reference"]["at_target"]
    if all(ph in at for ph in COMPARED):
        totals["reference_time_s"] = sum(at[ph]["time_s"] for ph in COMPARED)
        totals["reference_peak_delta_mb"] = max(at[ph]["delta_mb"] for ph in COMPARED)
        totals["reference_extrapolated"] = any(at[ph]["extrapolated"] for ph in COMPARED)
    record["totals"] = totals
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"profile_{scale_name}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    _plot(record, stem + ".png")
    log("")
    log(_table(record))
    log("meas = reference measured at this N; extr = extrapolated from the fitted growth exponent"
        + "".join(f"\n  {ph}: time ~ N^{v['time_exponent']:.2f}, memory ~ N^{v['memory_exponent']:.2f}"
                  for ph, v in record["reference"]["fit"].items()))
    log(f"wrote {stem}.json and {stem}.png")
    return record


def synthetic_sparse_scores(features, heads, eps, max_per_block, temperature: float = 30.0, batch: int = 4096):
    """synthetic_scores' rows fed batch by batch to a ScoreSparsifier: the dense (N, D) matrix
    is never held (what extraction does with `--inter-mode sparse`)."""
    from iics_fast.sparse import ScoreSparsifier

    n = features.shape[0]
    sp = ScoreSparsifier([h.shape[0] for h in heads], eps, max_per_block, n_total=n)
    for start in range(0, n, batch):
        f = features[start:start + batch]
        sp.add(synthetic_scores(f, None, heads, temperature))
    return sp.finish()


def projected_logits(features, heads, rank: int = 128, temperature: float = 30.0, seed: int = 0):
    """A cheaper stand-in for the heads' logits at N in the 10^5s: temperature x cosine between
    features and prototypes after one random orthonormal projection to `rank` dimensions
    (features and prototypes normalised again there). Returns a function rows -> (b, D) logits."""
    d = features.shape[1]
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, rank)))
    q = q.astype(np.float32)

    def unit(x):
        x = x @ q
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    w = torch.from_numpy(np.ascontiguousarray(unit(np.concatenate(heads)).T * np.float32(temperature)))
    return lambda rows: torch.from_numpy(unit(features[rows])) @ w


def direct_sparse_scores(logits, n, dims, eps, cap, batch: int = 8192, sample: int = 1024):
    """SparseScores of the per-head softmax of `logits(rows)` without the dense softmax: per
    block the `cap` largest logits (torch.topk; ties at the cut as topk breaks them) give the kept
    entries exp(z - logsumexp), the first of them whose mass reaches 1 - eps ends the block, and
    the block's dropped mass 1 - kept spreads evenly over its dropped entries; the sampled rows
    are kept whole. Equal to ScoreSparsifier on the dense softmax (tests/test_sparse.py) up to
    rounding and tie order; what `--fast-scores` profiles at N in the 10^5s."""
    from iics_fast.sparse import SparseScores, sample_rows

    dims = tuple(int(k) for k in dims)
    starts = np.concatenate([[0], np.cumsum(dims)])
    ptrs, cols, vals, totals, dropped, tails = [np.zeros(1, np.int64)], [], [], [], [], []
    nnz = 0
    for r0 in range(0, n, batch):
        z = logits(np.arange(r0, min(n, r0 + batch)))
        b = z.shape[0]
        row_cols, row_vals, row_tail, kept = [], [], [], torch.zeros(b, dtype=torch.float64)
        for h, k in enumerate(dims):
            block = z[:, starts[h]:starts[h + 1]]
            lse = torch.logsumexp(block.double(), 1, keepdim=True)
            width = min(k, cap)
            top, idx = torch.topk(block, width, dim=1, sorted=True)
            p = torch.exp(top.double() - lse)
            count = ((torch.cumsum(p, 1) < 1.0 - eps).sum(1) + 1).clamp(max=width)
            keep = torch.arange(width)[None, :] < count[:, None]
            p = torch.where(keep, p, 0.0)
            kept += p.sum(1)
            left = (k - count).double()
            row_tail.append(torch.where(left > 0, (1.0 - p.sum(1)).clamp_min(0) / left.clamp_min(1), 0.0))
            row_cols.append(torch.where(keep, idx + int(starts[h]), -1))
            row_vals.append(p.float())
        c = torch.cat(row_cols, 1)
        v = torch.cat(row_vals, 1)
        order = torch.argsort(torch.where(c < 0, int(starts[-1]), c), dim=1)  # columns ascending
        c, v = torch.gather(c, 1, order), torch.gather(v, 1, order)
        mask = c >= 0
        counts = mask.sum(1)
        ptrs.append(nnz + torch.cumsum(counts, 0).numpy())
        nnz += int(counts.sum())
        cols.append(c[mask].to(torch.int32).numpy())
        vals.append(v[mask].numpy())
        totals.append(np.full(b, float(len(dims)), np.float32))
        dropped.append((len(dims) - kept).clamp_min(0).float().numpy())
        tails.append(torch.stack(row_tail, 1).float().numpy())
    picked = sample_rows(n, sample)
    z = logits(picked)
    whole = torch.cat([torch.softmax(z[:, starts[h]:starts[h + 1]].double(), 1)
                       for h in range(len(dims))], 1).float().numpy()
    return SparseScores(np.concatenate(ptrs), np.concatenate(cols), np.concatenate(vals), np.concatenate(totals),
                        np.concatenate(dropped), dims, picked, whole, np.concatenate(tails))


def run_sparse(n, cameras, k_inter, seed=0, k_intra=K_INTRA, similarity="rerank", k=32, eps=1e-3,
               max_per_block=None, compare_dense=False, heads="clusters", fast_scores=False, index="auto",
               log=print):
    """One round through the sparse inter-camera path (iics_fast.sparse), and with compare_dense
    the dense round on the same data in the same process, its partition compared by ARI.
    heads="clusters": the simulated classifier heads are the intra-camera clusters' mean
    features (the intra-camera clustering runs first); "samples": each head's prototypes are
    images drawn from its camera (heads_from_samples, no clustering: for N in the 10^5s).
    fast_scores: the sparse scores straight from projected logits (direct_sparse_scores; needs
    max_per_block, no dense comparison). index: the round's k-NN index ("auto", "flat", "ivf").
    Returns (PhaseResults, info dict)."""
    from iics_fast import sparse as S

    if heads not in ("clusters", "samples"):
        raise ValueError(f"heads must be 'clusters' or 'samples', got {heads!r}")
    if fast_scores and (max_per_block is None or compare_dense):
        raise ValueError("--fast-scores needs --max-per-block and cannot be compared with the dense round")
    res: list[PhaseResult] = []
    with meter("extract", res, "simulated: synthetic features"):
        feats, camids, _ = synthetic_features(n, cameras, seed)
    log(f"  extract (simulated)   {res[-1].time_s:8.2f} s")
    if heads == "clusters":
        rerank, _ = _trainer_settings()
        how = "re-ranked" if rerank else "cosine"
        with meter("intra", res, f"per camera: {how} + average linkage into {k_intra}"):
            labels = pipeline.intra_camera_labels(torch.from_numpy(feats), camids, k_intra, rerank=rerank)
        log(f"  intra                 {res[-1].time_s:8.2f} s")
        heads = heads_from_labels(feats, camids, labels)
    else:
        heads = heads_from_samples(feats, camids, k_intra, seed)
    if fast_scores:
        with meter("scores", res, f"simulated: top-{max_per_block} of projected logits a head (eps {eps})"):
            sp = direct_sparse_scores(projected_logits(feats, heads), n, [h.shape[0] for h in heads], eps,
                                      max_per_block)
    else:
        with meter("scores", res, f"simulated, sparsified batch by batch (eps {eps}, cap {max_per_block})"):
            sp = synthetic_sparse_scores(feats, heads, eps, max_per_block)
    nnz = int(sp.ptr[-1])
    log(f"  scores (sparse)       {res[-1].time_s:8.2f} s   {nnz / n:.0f} entries a row, "
        f"{(sp.col.nbytes + sp.val.nbytes) / 2**20:.0f} MB")
    info = {"D": int(sum(h.shape[0] for h in heads)), "nnz_per_row": nnz / n, "similarity": similarity,
            "k": k, "eps": eps, "max_per_block": max_per_block, "index": index}
    with meter("sparse_round", res, f"{similarity}: k-NN graph, edge terms, linkage into {k_inter}"):
        sparse_labels, round_info = S.sparse_inter_round(feats, sp, camids, k_inter, MU, similarity=similarity, k=k,
                                                         index=index, log=log)
    info["round"] = round_info
    log(f"  sparse round          {res[-1].time_s:8.2f} s   cpu {res[-1].cpu_s:.1f} s   "
        f"peak {res[-1].peak_mb:.0f} MB   "
        f"{round_info}")
    del sp
    if compare_dense:
        with meter("dense_scores", res, "simulated: the dense (N, D) scores the dense round reads"):
            scores = synthetic_scores(feats, camids, heads)
        with meter("dense_round", res, f"{similarity}: fused Eq. 5, re-ranking, merge (the dense reference)"):
            dense_labels = S.inter_round_dense_ref(feats, scores, camids, k_inter, MU, similarity=similarity)
        del scores
        from sklearn.metrics import adjusted_rand_score
        info["ari_sparse_vs_dense"] = float(adjusted_rand_score(dense_labels, sparse_labels))
        info["equal_partitions"] = bool(adjusted_rand_score(dense_labels, sparse_labels) == 1.0)
        log(f"  dense round           {res[-1].time_s:8.2f} s   cpu {res[-1].cpu_s:.1f} s   "
            f"peak {res[-1].peak_mb:.0f} MB   "
            f"ARI(sparse, dense) = {info['ari_sparse_vs_dense']:.5f}")
    return res, info


def profile_sparse(n, cameras, k_inter, scale_name=None, seed=0, out="profile_out", log=print, **kw):
    """run_sparse, written to profile_sparse_<scale>.json under `out`; returns the record."""
    scale_name = scale_name or str(n)
    log(f"sparse inter-camera round at {scale_name}: N={n}, C={cameras}, k_inter={k_inter}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    phases, info = run_sparse(n, cameras, k_inter, seed, log=log, **kw)
    record = {"scale": scale_name, "N": n, "C": cameras, "k_inter": k_inter, "mode": "sparse",
              "machine": {**machine_info(), "torch_threads": torch.get_num_threads()}, "load_before": load,
              "load_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "command": "python -m benchmarks.profile " + " ".join(sys.argv[1:]),
              "phases": [asdict(p) for p in phases], "info": info}
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"profile_sparse_{scale_name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    log(f"load average before {load}, after {record['load_after']}; wrote {path}")
    return record


def parse_scale(text, cameras=None):
    """'msmt17' etc. or an image count; returns (name, N, C, k_inter). cameras: None for the
    scale's default, else at least 1."""
    if cameras is not None and cameras < 1:
        raise ValueError(f"--cameras must be at least 1, got {cameras}; leave it out for the scale's default")
    if text in SCALES:
        n, c, k = SCALES[text]
        return text, n, c if cameras is None else cameras, k
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--scale must be one of {sorted(SCALES)} or an image count, got {text!r}") from None
    if n < 2:
        raise ValueError(f"--scale N needs at least 2 images, got {n}")
    c = 6 if cameras is None else cameras
    return str(n), n, min(c, n), min(800, max(1, n // 16))


def check_options(args, kw, n, cameras):
    """Raise a ValueError naming the first bad option and its fix. args: the parsed options; kw: the
    mode's own options that were given; n, cameras: the round's N and C."""
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.k_inter is not None and not 1 <= args.k_inter <= n:
        raise ValueError(f"--k-inter must be in 1..N = {n}, got {args.k_inter}")
    low = max(2, cameras)  # an image a camera
    if any(s < low for s in kw.get("reference_sizes", ())):
        raise ValueError(f"--reference-sizes must each be at least {low} (2, and an image a camera), "
                         f"got {kw['reference_sizes']}")
    if kw.get("reference_rows", 1) < 1:
        raise ValueError(f"--reference-rows must be >= 1, got {kw['reference_rows']}")
    if not kw.get("reference_max_gb", 1) > 0:
        raise ValueError(f"--reference-max-gb must be > 0, got {kw['reference_max_gb']}; "
                         f"--no-reference skips the reference")
    if kw.get("k", 1) < 1:
        raise ValueError(f"--k (neighbours a row) must be >= 1, got {kw['k']}")
    if not 0 <= kw.get("eps", 0) < 1:
        raise ValueError(f"--eps (score mass a head may drop) must be in [0, 1), got {kw['eps']}")
    if kw.get("max_per_block", 1) < 1:
        raise ValueError(f"--max-per-block must be >= 1, got {kw['max_per_block']}")
    if "fast_scores" in kw and "max_per_block" not in kw:
        raise ValueError("--fast-scores needs --max-per-block (entries kept a head), e.g. --max-per-block 16")
    if "fast_scores" in kw and "compare_dense" in kw:
        raise ValueError("--fast-scores cannot be combined with --compare-dense (the dense round needs the "
                         "dense scores): drop one of them")
    rundir.check_writable(args.out)


def main(argv=None):
    """Parse `argv`, check every option before any work, run the profile of --mode and return
    its record. A bad option raises a ValueError naming it, which `python -m benchmarks.profile`
    prints as one line `error: ...` with exit status 2 (iics_fast.cli.run)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    only = {"dense": [], "sparse": []}  # options of one mode: refused in the other, where they change nothing

    def option(mode, *flags, **kw):
        only[mode].append(parser.add_argument(*flags, default=argparse.SUPPRESS, **kw))

    parser.add_argument("--scale", default="market1501", help="market1501 | dukemtmc | msmt17 | an image count N")
    parser.add_argument("--cameras", type=int, help="cameras C (default: the dataset's, 6 for a count)")
    parser.add_argument("--out", default="profile_out", help="folder for the JSON record and the PNG chart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("dense", "sparse"), default="dense",
                        help="dense: the round beside the reference pipeline; sparse: the sparse round "
                             "(iics_fast.sparse), no N x N matrix")
    parser.add_argument("--k-inter", type=int,
                        help="inter-camera clusters (default: the scale's; for a count N, min(800, N // 16))")
    option("dense", "--reference-sizes", type=int, nargs="+", help="dense mode: N at which to run the reference")
    option("dense", "--reference-rows", type=int, help="dense mode: rows of the reference Jaccard loop to time [16]")
    option("dense", "--reference-max-gb", type=float,
           help="dense mode: skip reference sizes estimated above this [8]")
    option("dense", "--no-reference", dest="reference", action="store_false",
           help="dense mode: profile iics_fast only")
    option("sparse", "--similarity", choices=("rerank", "cosine"),
           help="sparse mode: with or without the k-reciprocal re-ranking [rerank]")
    option("sparse", "--k", type=int, help="sparse mode: neighbours a row in the candidate graph [32]")
    option("sparse", "--eps", type=float, help="sparse mode: score mass each head may drop [0.001]")
    option("sparse", "--max-per-block", type=int, help="sparse mode: entries kept a head at most [no cap]")
    option("sparse", "--heads", choices=("clusters", "samples"),
           help="sparse mode: simulated heads from the intra-camera clusters (runs the intra-camera "
                "clustering) or from sampled images (no clustering) [clusters]")
    option("sparse", "--fast-scores", action="store_true",
           help="sparse mode: simulate the sparse scores straight from logits in a 128-d projection "
                "(top entries only, never the dense N x D): for N in the 10^5s; needs --max-per-block")
    option("sparse", "--index", choices=("auto", "flat", "ivf"),
           help="sparse mode: the k-NN index (auto: flat up to 60,000 images, 200,000 for the "
                "re-ranking round, IVF above) [auto]")
    option("sparse", "--compare-dense", action="store_true",
           help="sparse mode: also run the dense round on the same data and report the ARI")
    args = parser.parse_args(argv)
    other = "sparse" if args.mode == "dense" else "dense"
    wrong = [a.option_strings[0] for a in only[other] if a.dest in vars(args)]
    if wrong:
        it = "it" if len(wrong) == 1 else "them"
        raise ValueError(f"{', '.join(wrong)} appl{'ies' if it == 'it' else 'y'} to --mode {other} only "
                         f"(--mode {args.mode} ignores {it}): add --mode {other} or drop {it}")
    kw = {a.dest: getattr(args, a.dest) for a in only[args.mode] if a.dest in vars(args)}
    name, n, c, k = parse_scale(args.scale, args.cameras)
    check_options(args, kw, n, c)
    k = k if args.k_inter is None else args.k_inter
    if args.mode == "sparse":
        return profile_sparse(n, c, k, name, args.seed, args.out, **kw)
    return profile(n, c, k, name, seed=args.seed, out=args.out, **kw)


if __name__ == "__main__":
    from iics_fast.cli import run

    run(main)
