"""The GPU kernels at MSMT17 scale, each timed against its static H100 estimate (the timing part of
benchmarks/gpu_check.sh).

    python -m benchmarks.gpu_check --json rows.json            # on a CUDA device
    python -m benchmarks.gpu_check --dry-run --json rows.json  # CPU fallbacks at small sizes

Rows (one a kernel): the Triton inter-camera distance (Eq. 5, float32) at N = 32,621 images of 15
cameras, 2,048-d features and 9,000-d scores, against the gpu_report estimate from its sm_90
compile; the CUDA merge of a condensed float32 triangle of 32,621 points (synthetic distances of
that shape) against the bandwidth model of benchmarks/gpu_cuda.py over passes the host
instantiation measures on the same distances, whose linkage matrix the device's must equal; AIBN
forward + backward at a ResNet-50 layer-1 shape of a training batch (no static estimate).

--dry-run runs every row on the CPU (the C++ distance, the host merge, the Triton interpreter for
AIBN) at small sizes, so the script itself is tested without a GPU; its times say nothing about a
GPU.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchmarks import gpu_cuda

SCALES = {
    "msmt17": {"name": "msmt17", "N": 32621, "C": 15, "D": 9000, "d": 2048, "batch": 64,
               "ids": 4101, "aibn": (64, 256, 64, 32)},
    "dry": {"name": "dry", "N": 700, "C": 3, "D": 90, "d": 32, "batch": 4, "ids": 90,
            "aibn": (2, 8, 6, 5)},
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(fn, device, repeats):
    """Best wall time of `repeats` calls (after one warm-up call, which compiles)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - tic)
    return best


def _triton_estimate(name, scale):
    """The gpu_report H100 estimate of one Triton kernel at a scale, from its sm_90 compile."""
    from benchmarks import gpu_report

    spec = next(s for s in gpu_report.all_specs() if s.name == name)
    report = gpu_report.compile_report(spec, 90)
    return gpu_report.estimate_time(report, gpu_report.all_work_models()[name](scale)).estimate_s


def distance_row(device, scale, repeats):
    from iics_fast import similarity

    g = torch.Generator().manual_seed(0)
    n, c = scale["N"], scale["C"]
    feats = torch.randn(n, scale["d"], generator=g).to(device)
    scores = torch.rand(n, scale["D"], generator=g).pow(4).to(device)
    cams = torch.randint(0, c, (n,), generator=g).to(device)
    out = torch.empty(n * (n - 1) // 2, dtype=torch.float32, device=device)

    def run():
        similarity.inter_camera_distance(feats, scores, cams, 0.02, out=out)

    t = _best_of(run, device, repeats)
    finite = bool(torch.isfinite(out).all())
    return {"kernel": "inter_camera_eq5_fp32", "scale": f"N={n:,} D={scale['D']:,}",
            "time_s": t, "estimate_s": _triton_estimate("inter_camera_eq5_fp32", scale),
            "check": "finite" if finite else "NON-FINITE", "ok": finite}


def merge_row(device, scale, repeats):
    from iics_fast import cluster

    n = scale["N"]
    cond = gpu_cuda.synthetic_condensed(n, scale["ids"], scale["C"], device=device)
    est = gpu_cuda.merge_estimate(cond=cond.cpu().numpy())  # the same distances on the host
    if device.type == "cuda":
        def run():
            return cluster.linkage(cond, inplace=False)
    else:  # the host instantiation of the same passes
        from iics_fast._native import native

        host = cond.numpy()

        def run():
            return native().cluster_linkage(host, cluster.METHODS["average"], False, False, True)

    t = _best_of(run, device, repeats)
    equal = bool(np.array_equal(run(), est["Z"]))
    return {"kernel": "cuda merge (average)", "scale": f"N={n:,}, {est['passes']} passes",
            "time_s": t, "estimate_s": est["estimate_s"],
            "check": "Z equals host passes" if equal else "Z DIFFERS from host passes",
            "ok": equal}


def aibn_row(device, scale, repeats):
    from iics_fast.kernels.aibn import aibn, aibn_ref

    g = torch.Generator().manual_seed(0)
    shape = scale["aibn"]
    c = shape[1]
    x = torch.randn(shape, generator=g).to(device).requires_grad_()
    w, b = torch.ones(c, device=device, requires_grad=True), torch.zeros(c, device=device, requires_grad=True)
    a = torch.full((1,), 0.3, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    grad = torch.randn(shape, generator=g).to(device)

    def run(fn=aibn):
        y = fn(x, rm.clone(), rv.clone(), w, b, a, True)
        y.backward(grad)
        return y

    t = _best_of(run, device, repeats)
    y, dx = run().detach(), x.grad.clone()
    x.grad = None
    y_ref = run(aibn_ref).detach()
    close = bool(torch.allclose(y, y_ref, rtol=1e-3, atol=1e-3))
    return {"kernel": "aibn fwd+bwd fp32", "scale": "x".join(map(str, shape)), "time_s": t,
            "estimate_s": None, "check": "equals aibn_ref" if close else "DIFFERS from aibn_ref",
            "ok": close and bool(torch.isfinite(dx).all())}


def run_rows(dry_run: bool, repeats: int = 3) -> list[dict]:
    device = torch.device("cpu" if dry_run else "cuda")
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (torch.cuda.is_available() is False); use --dry-run")
    scale = SCALES["dry" if dry_run else "msmt17"]
    rows = []
    for fn in (distance_row, merge_row, aibn_row):
        try:
            row = fn(device, scale, repeats)
        except Exception as exc:  # a failing row is reported, the others still run
            row = {"kernel": fn.__name__.replace("_row", ""), "scale": scale["name"], "time_s": None,
                   "estimate_s": None, "check": f"ERROR {type(exc).__name__}: {exc}"[:160],
                   "ok": False}
        row["device"] = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row) -> str:
    t, e = row["time_s"], row["estimate_s"]
    ms = lambda v: "-" if v is None else f"{v * 1e3:.4g}"  # noqa: E731
    ratio = "-" if t is None or e is None else f"{t / e:.3g}"
    return (f"{row['kernel']:24s} {row['scale']:24s} {ms(t):>10s} {ms(e):>12s} {ratio:>6s}  "
            f"{'ok' if row['ok'] else 'FAIL'}  {row['check']}")


HEADER = (f"{'kernel':24s} {'scale':24s} {'time ms':>10s} {'estimate ms':>12s} {'ratio':>6s}  "
          "result")


def summary(work: str) -> tuple[str, bool]:
    """The one table of gpu_check.sh from its work folder: steps.tsv (step, exit status, seconds,
    budget), kernels.json (rows of this module) and train/metrics.jsonl (phase times a round)."""
    import os

    lines, ok = [f"{'step':24s} {'result':>8s} {'seconds':>8s} {'budget':>7s}"], True
    with open(os.path.join(work, "steps.tsv")) as f:
        for line in f:
            step, rc, secs, budget = line.rstrip("\n").split("\t")
            result = "ok" if rc == "0" else ("TIMEOUT" if rc == "124" else f"FAIL {rc}")
            ok &= rc == "0"
            lines.append(f"{step:24s} {result:>8s} {float(secs):8.0f} {budget:>7s}")
    path = os.path.join(work, "kernels.json")
    if os.path.exists(path):
        with open(path) as fh:
            lines += ["", HEADER] + [format_row(r) for r in json.load(fh)]
    path = os.path.join(work, "train", "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as fh:
            rounds = [json.loads(line) for line in fh]
        phases = list(rounds[0]["time"]) if rounds else []
        lines += ["", f"{'training round':16s}" + "".join(f"{p[:12]:>13s}" for p in phases)]
        for r in rounds:
            lines.append(f"{r['round']:<16d}" + "".join(f"{r['time'][p]:13.2f}" for p in phases))
    else:
        ok = False
        lines.append("training: no metrics.jsonl written")
    return "\n".join(lines), ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU fallbacks at small sizes")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--summary", metavar="WORK", help="print gpu_check.sh's table of WORK")
    args = parser.parse_args(argv)
    if args.summary:
        table, ok = summary(args.summary)
        print(table)
        return 0 if ok else 1
    print(HEADER)
    rows = run_rows(args.dry_run, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
