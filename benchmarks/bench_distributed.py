"""Sharded inter-camera distance build (iics_fast.distributed) on gloo ranks of this machine,
against the single-process `inter_camera_distance` measured in the same run (the ranks run the
same op on their row ranges, `rows=(r0, r1)`); and one training round of the demo network under
torchrun against one process (`test_bench_training_round`).

    pytest benchmarks/bench_distributed.py -s                        # N = 4,000, 2 ranks
    IICS_BENCH_SCALE=large pytest benchmarks/bench_distributed.py -s  # N = 8,000
    python -m benchmarks.bench_distributed [--n N] [--world W]      # from the repository root

The sharded result is checked bitwise against the single-process build first. Peak = growth of
each rank's peak resident size (VmHWM, reset once the inputs are loaded) during the build. On a machine with fewer
cores than ranks x threads the ranks compete for the cores: the figures then show the cost of
the sharding (block bookkeeping, transfer), not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.multiprocessing as mp

from benchmarks.bench_pairwise import make_case
from benchmarks.probes import PeakMemory, free_port
from iics_fast import distributed as D
from iics_fast.similarity import inter_camera_distance, sharded_inter_camera_distance

MU = 0.02


def _case(n):
    return make_case(n, cams=6, dim_per_cam=600, d=2048)


def _rank_main(r, world, port, n, outdir):
    os.environ.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    feats, scores, camids = _case(n)
    with D.init_from_env():
        with PeakMemory() as mem:
            D.barrier()
            t0 = time.perf_counter()
            out = sharded_inter_camera_distance(feats, scores, camids, MU, dst=0)
            wall = time.perf_counter() - t0
        torch.save({"wall": wall, "peak": mem.grew_mib, "out": out}, os.path.join(outdir, f"rank{r}.pt"))
        D.barrier()


def run(n, world, outdir):
    feats, scores, camids = _case(n)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        fused = inter_camera_distance(feats, scores, camids, MU, backend="cpu")
        t_fused = time.perf_counter() - t0
    p_fused = mem.grew_mib
    mp.spawn(_rank_main, args=(world, free_port(), n, outdir), nprocs=world, join=True)
    res = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    assert torch.equal(res[0]["out"], fused), "sharded build differs from inter_camera_distance"
    assert all(x["out"] is None for x in res[1:])
    mb = n * (n - 1) // 2 * 4 / 2**20
    print(f"\nN = {n:,}, condensed float32 result {mb:,.0f} MB, {world} gloo ranks, "
          f"{os.cpu_count()} cores; sharded == the single-process build (bitwise)")
    print(f"  single process, inter_camera_distance (fused):  {t_fused:7.2f} s, peak + {p_fused:,.0f} MB")
    for r, x in enumerate(res):
        print(f"  rank {r}: sharded build wall {x['wall']:7.2f} s ({x['wall'] / t_fused:.2f} x fused), "
              f"peak + {x['peak']:,.0f} MB")
    return t_fused, [x["wall"] for x in res]


def test_bench_sharded_distance(tmp_path):
    n = 8000 if os.environ.get("IICS_BENCH_SCALE") == "large" else 4000
    run(n, 2, str(tmp_path))


def _round_times(argv, out, nproc):
    """Per-phase seconds of one training round: `python -m iics_fast.train`, or under torchrun
    with `nproc` processes; the times are rank 0's, as written to metrics.jsonl."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    t0 = time.perf_counter()
    proc = subprocess.run(launcher + ["-m", "iics_fast.train", *argv, "--out", out],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        row = json.loads(fh.readline())
    return row["time"], wall


def test_bench_training_round(tmp_path):
    """One round of the demo preset (4 synthetic cameras, ResNet-18, 64x32) with one process
    against torchrun: K GPUs with NCCL where there are at least two, else 2 gloo processes with
    one thread each against one process with two threads (the same cores)."""
    gpus = torch.cuda.device_count()
    nproc = gpus if gpus >= 2 else 2
    argv = ["--rounds", "1", "--eval-every", "0", "--no-progress", "--no-verbose",
            "--pretrained", "none"]  # the round's time does not depend on the weights
    if gpus < 2:
        argv += ["--device", "cpu"]
    if os.environ.get("IICS_BENCH_SCALE") == "large":
        argv += ["--epochs-intra", "4", "--epochs-inter", "4"]
    one, one_wall = _round_times(argv + (["--threads", str(nproc)] if gpus < 2 else []),
                                 str(tmp_path / "one"), 1)
    threads = ["--threads", "1"] if gpus < 2 else []
    many, many_wall = _round_times(argv + threads, str(tmp_path / "many"), nproc)
    loose, _ = _round_times(argv + threads + ["--no-sync-bn"], str(tmp_path / "loose"), nproc)
    kind = f"{nproc} GPUs (NCCL)" if gpus >= 2 else "2 gloo processes x 1 thread vs 1 x 2 threads"
    print(f"\ntraining round of the demo network, {kind} (ratio: one process / {nproc}):")
    for phase in one:
        print(f"  {phase:14s} one process {one[phase]:7.2f} s   {nproc} processes "
              f"{many[phase]:7.2f} s ({one[phase] / max(many[phase], 1e-9):.2f} x), "
              f"--no-sync-bn {loose[phase]:7.2f} s ({one[phase] / max(loose[phase], 1e-9):.2f} x)")
    print(f"  {'whole command':14s} one process {one_wall:7.2f} s   {nproc} processes "
          f"{many_wall:7.2f} s (start-up included)")


if __name__ == "__main__":
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        run(args.n, args.world, d)
