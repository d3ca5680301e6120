"""Train IICS: `python -m iics_fast.train [options]`.

With no arguments: the embedded synthetic camera network, ResNet-18 from the synthetic source
weights (trained on first use, cached), 64x32 input, a few short rounds on the CPU (the
`synthetic` preset; docs/demo.md). For the paper's setting:
`python -m iics_fast.train --dataset market1501 --root DATA --pretrained resnet50.pth`.

Settings resolve in this order, later wins: DEFAULTS (the paper's Market-1501 setting) ->
PRESETS[dataset] -> `--config FILE` (JSON or TOML, same keys) -> command line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import distributed as D

# ---------------------------------------------------------------------------------------------
# defaults: the reference code's (SY-Xuan/IICS) and the paper's Market-1501 setting; where
# iics_fast differs on purpose, docs/deviations.md says so. key: (default, help)
DEFAULTS = {
    # data
    "dataset": ("synthetic", "market1501 | dukemtmc | msmt17 | synthetic | folder"),
    "root": (None, "dataset directory (synthetic: generated into $IICS_FAST_CACHE)"),
    "dataset_options": ({}, "extra options of iics_fast.datasets.build, as JSON"),
    "height": (256, "input height (bicubic resize)"),
    "width": (128, "input width"),
    # model
    "arch": ("resnet50", "backbone: resnet50 | resnet18"),
    "pretrained": (None, "ImageNet weights: a torchvision-format state dict file; "
                         "'synthetic-source': the demo's source weights (trained on first use, "
                         "cached); 'none': random init"),
    "init_alpha": (0.1, "initial AIBN mixture weight (reference code 0.1; paper text 0.5)"),
    "last_stride": (1, "stride of layer4"),
    # rounds
    "rounds": (40, "training rounds R"),
    "stages": ("both", "both | intra (Table 1: stage 1 only)"),
    "supervised": (False, "upper bound: the stage-2 losses on the TRUE training identities, "
                          "as many SGD steps as IICS takes, same initialisation"),
    "eval_every": (5, "evaluate every N rounds (and after the last); 0 = never"),
    # intra-camera clustering and stage 1
    "similarity": ("rerank", "rerank (the reference: k-reciprocal re-ranking before each "
                             "clustering, both stages) | cosine (the paper's rows without it)"),
    "rerank_k1": (20, "re-ranking k1"),
    "rerank_k2": (6, "re-ranking k2"),
    "rerank_lambda": (0.3, "re-ranking lambda"),
    "k_intra": (600, "clusters per camera (a camera with fewer images: max(1, n_c // 2))"),
    "threshold_intra": (None, "cluster by the distance at this quantile of the nonzero distances "
                              "instead of k_intra (the reference's threshold variant: 0.0025)"),
    "epochs_intra": (2, "stage-1 epochs per round (MSMT17: 12)"),
    "batch_per_camera": (8, "stage-1 images per camera per iteration"),
    "lr_intra": (0.0005, "stage-1 learning rate of the backbone (AIBN alphas included)"),
    "lr_intra_head": (0.005, "stage-1 learning rate of the per-camera heads"),
    # inter-camera clustering and stage 2
    "inter_similarity": ("eq5", "eq5 | jaccard | feature (Table 1 ablations)"),
    "mu": (0.02, "mu_0: weight of the Jaccard term in Eq. 5"),
    "mu_power": (0.6, "poly decay mu_r = mu_0 (1 - r/R)^power"),
    "k_inter": (800, "inter-camera clusters (MSMT17: 1200)"),
    "threshold_inter": (None, "cluster by the distance at this quantile of the nonzero distances "
                              "instead of k_inter (the reference's threshold variant: 0.0017)"),
    "epochs_inter": (2, "stage-2 epochs per round"),
    "batch_p": (16, "stage-2 clusters per batch P"),
    "batch_k": (4, "stage-2 images per cluster K"),
    "lr_inter": (0.001, "stage-2 learning rate of the backbone"),
    "lr_inter_head": (0.01, "stage-2 learning rate of the head"),
    "margin": (0.3, "batch-hard triplet margin"),
    "triplet_weight": (1.0, "weight of the triplet loss (lambda of Eq. 11)"),
    # optimiser (both stages)
    "momentum": (0.9, "SGD momentum"),
    "weight_decay": (5e-4, "SGD weight decay"),
    # runtime
    "device": ("auto", "auto | cpu | cuda | cuda:N"),
    "amp": ("bf16", "CUDA autocast: bf16 | fp16 (with a GradScaler) | off; CPU is float32"),
    "workers": (None, "DataLoader workers (default: 0 on CPU, min(8, cores) on CUDA)"),
    "batch_extract": (128, "batch size of feature extraction"),
    "threads": (None, "CPU threads of torch (default: torch's choice; fewer helps on a busy CPU)"),
    "sync_bn": (True, "under torchrun: stage 2 normalises with the whole batch's statistics over "
                      "all processes, as one process does; --no-sync-bn: "
                      "each process its share's (faster, not the one-process result)"),
    "seed": (1, "seed of every random draw"),
    "out": (None, "output directory (default: runs/<dataset>-<time>)"),
    "progress": (True, "progress bars"),
    "verbose": (True, "per-round log lines"),
}

# per-dataset settings of the paper, and the CPU demo
PRESETS = {
    "market1501": {},
    "dukemtmc": {},
    "msmt17": {"epochs_intra": 12, "k_inter": 1200},  # the paper's (docs/deviations.md)
    "folder": {},
    # demo preset choices (not the paper's), sized for a 2-core CPU (docs/demo.md): ResNet-18
    # from the synthetic source weights (ImageNet's part: labelled training on another
    # synthetic population, trained on first use and cached), 64x32 input, a 4-camera synthetic
    # network (each id seen by 2-4 cameras, 1-3 images each) of 32 training ids and 48 test ids
    # + 40 distractors (64 queries, so one query is 1.6% of rank-1), cluster counts scaled to it
    # (about 1.1x the ids a camera / in all, as 600 / 800 are for Market-1501), learning rates
    # 4x the paper's (few iterations), 6 rounds, evaluation every round, PK batches of 8
    # clusters x 4, one torch thread (a shared 2-core machine).
    "synthetic": {
        "arch": "resnet18", "height": 64, "width": 32, "pretrained": "synthetic-source",
        "dataset_options": {"num_ids": 32, "num_cameras": 4, "images_per_camera": [1, 3],
                            "num_test_ids": 48, "num_distractors": 40, "seed": 0},
        "rounds": 6, "eval_every": 1, "k_intra": 26, "k_inter": 36, "batch_p": 8, "threads": 1,
        # cosine: measured against re-ranking by the ablation (docs/demo.md), a little ahead
        "similarity": "cosine",
        "lr_intra": 0.002, "lr_intra_head": 0.02, "lr_inter": 0.004, "lr_inter_head": 0.04,
    },
}

CHOICES = {"arch": ("resnet50", "resnet18"), "stages": ("both", "intra"),
           "similarity": ("cosine", "rerank"), "inter_similarity": ("eq5", "jaccard", "feature"),
           "amp": ("bf16", "fp16", "off")}
TYPES = {"root": str, "pretrained": str, "threshold_intra": float, "threshold_inter": float,
         "workers": int, "threads": int, "out": str, "dataset_options": json.loads}
RUNTIME_KEYS = ("device", "workers", "threads", "batch_extract", "progress", "verbose", "amp")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m iics_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON or TOML file with any of the keys below")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    for key, (default, text) in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, dest=key, default=argparse.SUPPRESS,
                           action=argparse.BooleanOptionalAction, help=f"{text} [{default}]")
            continue
        kind = TYPES.get(key, type(default) if default is not None else str)
        p.add_argument(flag, dest=key, type=kind, choices=CHOICES.get(key),
                       default=argparse.SUPPRESS, help=f"{text} [{default}]")
    return p.parse_args(argv)


def read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r} is not a file")
    with open(path, "rb") as fh:
        if path.endswith(".toml"):
            import tomllib

            data = tomllib.load(fh)
        else:
            data = json.load(fh)
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown keys in {path}: {unknown}; valid keys: {sorted(DEFAULTS)}")
    for key, allowed in CHOICES.items():
        if key in data and data[key] not in allowed:
            raise ValueError(f"{path}: {key} must be one of {allowed}, got {data[key]!r}")
    return data


def resolve(args: argparse.Namespace) -> dict:
    """DEFAULTS -> PRESETS[dataset] -> config file -> command line; device resolved."""
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    from_file = read_config_file(args.config) if args.config else {}
    dataset = given.get("dataset", from_file.get("dataset", DEFAULTS["dataset"][0]))
    config = {k: v for k, (v, _) in DEFAULTS.items()}
    config.update(PRESETS.get(dataset, {}))
    config.update(from_file)
    config.update(given)
    if config["device"] == "auto":
        config["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(config["pretrained"], str) and config["pretrained"].lower() == "none":
        config["pretrained"] = None
    if config["out"] is None:
        config["out"] = os.path.join("runs", f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    return config


def prepare_out_dir(config: dict, given: dict, resume: bool):
    """Check --out against --resume; returns the checkpoint state to resume from (or None)."""
    out = config["out"]
    last = os.path.join(out, "last.pt")
    if not resume:
        if os.path.exists(os.path.join(out, "config.json")) or os.path.exists(last):
            raise ValueError(f"--out {out!r} holds another run: pass --resume to continue it "
                             f"or choose another --out")
        return config, None
    if not os.path.exists(last):
        raise ValueError(f"--resume: no checkpoint {last!r}; start the run without --resume "
                         f"(or point --out at the run to continue)")
    state = torch.load(last, map_location="cpu", weights_only=False)
    saved = dict(state["config"])
    clash = {k: (v, saved.get(k)) for k, v in given.items()
             if k not in RUNTIME_KEYS and k != "out" and saved.get(k) != v}
    if clash:
        raise ValueError("--resume continues the saved config; these options differ from it: "
                         + ", ".join(f"{k}={v!r} (saved {s!r})" for k, (v, s) in clash.items()))
    saved.update({k: config[k] for k in RUNTIME_KEYS if k in given})
    saved["out"] = out
    return saved, state


def results_table(metrics: list[dict], initial: dict | None = None) -> str:
    lines = ["| round | mAP | rank-1 | rank-5 | rank-10 |", "| --- | --- | --- | --- | --- |"]
    rows = ([("start", initial)] if initial else []) + [
        (row["round"] + 1, row["eval"]) for row in metrics if "eval" in row]
    for name, e in rows:
        lines.append(f"| {name} | {e['mAP']:.1%} | {e['rank1']:.1%} | {e['rank5']:.1%} | "
                     f"{e['rank10']:.1%} |")
    return "\n".join(lines)


def main(argv=None, hook=None) -> list[dict]:
    """Parses `argv`, trains, prints the results; returns the per-round metrics. Under torchrun
    (WORLD_SIZE > 1) it joins the process group (NCCL for --device cuda, gloo for cpu) and
    trains with every process; rank 0 prints and writes."""
    args = parse_args(argv)
    config = resolve(args)
    backend = "nccl" if config["device"].startswith("cuda") else "gloo"
    with D.init_from_env(backend):
        return _train(args, config, hook)


def _train(args, config, hook):
    from .checkpoint import atomic_write_text
    from .trainer import Trainer

    given = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    # rank 0 checks --out and reads the checkpoint; every rank gets its config and state
    config, state = D.agree(lambda: prepare_out_dir(config, given, args.resume), on_main_only=True)
    say = print if D.is_main() else (lambda *a, **k: None)
    say("config:\n" + json.dumps(config, indent=2), flush=True)
    if D.world_size() > 1:
        say(f"{D.world_size()} processes ({torch.distributed.get_backend()})", flush=True)

    # every check runs before training, on every rank
    trainer = D.agree(lambda: Trainer(config, resume_state=state, hook=hook))
    if D.is_main():
        atomic_write_text(json.dumps(config, indent=2) + "\n",
                          os.path.join(config["out"], "config.json"))
    if state is not None:
        p = state["progress"]
        say(f"resuming after round {p['round'] + 1} ({p['done']})", flush=True)
    tic = time.perf_counter()
    metrics = trainer.run()
    say(f"\ntrained {config['rounds']} rounds in {time.perf_counter() - tic:.0f}s; "
        f"outputs in {config['out']}")
    if any("eval" in row for row in metrics):
        say(results_table(metrics, trainer.initial_eval))
        best = trainer.best
        say(f"best rank-1 {best['rank1']:.1%} (mAP {best['mAP']:.1%}) at round "
            f"{best['round'] + 1} (best.pt)")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the message
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
