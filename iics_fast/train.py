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
import textwrap
import time

import torch

from . import datasets
from . import distributed as D
from .config import CHOICES

# ---------------------------------------------------------------------------------------------
# defaults: the reference code's (SY-Xuan/IICS) and the paper's Market-1501 setting; where
# iics_fast differs on purpose, docs/deviations.md says so. key: (default, help)
DEFAULTS = {
    # data
    "dataset": ("synthetic", "market1501 | dukemtmc | msmt17 | synthetic | folder"),
    "root": (None, "dataset directory (synthetic: generated into $IICS_FAST_CACHE)"),
    "dataset_options": ({}, "extra options of iics_fast.datasets.build, as JSON (in place of "
                        "the preset's whole set: give every option you need)"),
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
    "stage1_forward": ("grouped", "grouped: stage 1 forwards all cameras' images at once, each "
                                  "camera normalised with its own batch statistics (the "
                                  "reference's computation, its convolutions batched) | "
                                  "per-camera: one forward a camera, as the reference runs it"),
    "lr_intra": (0.0005, "stage-1 learning rate of the backbone (AIBN alphas included)"),
    "lr_intra_head": (0.005, "stage-1 learning rate of the per-camera heads"),
    # inter-camera clustering and stage 2
    "inter_similarity": ("eq5", "eq5 | jaccard | feature (Table 1 ablations)"),
    "inter_mode": ("dense", "dense | sparse | auto: the inter-camera round on the N x N distance, "
                            "without it (docs/sparse.md), or sparse when the dense one would not "
                            "fit the memory measured"),
    "sparse_k": (32, "sparse round: neighbours a row in its candidate graph"),
    "sparse_eps": (1e-3, "sparse round: softmax mass each head's scores may drop"),
    "sparse_max_per_block": (None, "sparse round: score entries kept a head at most (memory cap)"),
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
    "amp": ("bf16", "autocast: bf16 | fp16 (CUDA only, with a GradScaler) | off; on a CPU "
                    "bf16 only where it is native (AVX-512 BF16; not on AMX CPUs), else float32"),
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
    # network of 200 training ids (each seen by 2-4 cameras, 1-2 images each; camera styles at
    # 0.4 of full strength), 50 test ids + 50 distractors; cluster counts near the ids a camera
    # / in all (150 / 220), 3x the paper's stage-1 epochs and 2x its stage-2 epochs (few images:
    # the classifiers behind the Jaccard term need the steps), learning rates 4x the paper's,
    # evaluation every round, PK batches of 8 clusters x 4, every core
    "synthetic": {
        "arch": "resnet18", "height": 64, "width": 32, "pretrained": "synthetic-source",
        "dataset_options": {"num_ids": 200, "num_cameras": 4, "images_per_camera": [1, 2],
                            "num_test_ids": 50, "num_distractors": 50, "camera_strength": 0.4,
                            "seed": 0},
        "rounds": 6, "eval_every": 1, "k_intra": 150, "k_inter": 220, "batch_p": 8,
        "epochs_intra": 6, "epochs_inter": 4,
        # cosine: measured against re-ranking by the ablation (docs/demo.md)
        "similarity": "cosine",
        "lr_intra": 0.002, "lr_intra_head": 0.02, "lr_inter": 0.004, "lr_inter_head": 0.04,
    },
}



def json_object(text: str) -> dict:
    """--dataset-options: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at column {exc.colno}): "
                                         f"{text!r}; e.g. '{{\"verify\": true}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"verify\": true}}', "
                                         f"got {text!r}")
    return value


TYPES = {"root": str, "pretrained": str, "threshold_intra": float, "threshold_inter": float,
         "workers": int, "threads": int, "sparse_max_per_block": int, "out": str, "dataset_options": json_object}
# options a resumed run may change: how it runs, not what it computes (--root: the same
# dataset moved, checked by its contents)
RUNTIME_KEYS = ("device", "workers", "threads", "batch_extract", "progress", "verbose", "amp")
RESUMABLE_KEYS = RUNTIME_KEYS + ("out", "root")


def presets_epilog() -> str:
    """--help's closing text: each preset's overrides of the [defaults] shown beside the options,
    written from PRESETS so the two cannot disagree."""
    def flag(key, value):
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            return name if value else "--no-" + name[2:]
        if isinstance(value, (dict, list)):
            return f"{name} '{json.dumps(value, separators=(',', ':'))}'"
        return f"{name} {value}"

    lines = textwrap.wrap(f"presets: --dataset NAME replaces the [defaults] above with NAME's "
                          f"settings (default dataset: {DEFAULTS['dataset'][0]}); --config and the "
                          f"command line override them:", width=96)
    for name, overrides in PRESETS.items():
        line = f"  {name}:"
        for item in [flag(k, v) for k, v in overrides.items()] or ["(the defaults)"]:
            if len(line) + 1 + len(item) > 96 and line.strip():  # a flag and its value stay together
                lines.append(line)
                line = "     "
            line += " " + item
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m iics_fast.train", description=__doc__,
                                epilog=presets_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON or TOML file with any of the keys below")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--allow-nonempty-out", action="store_true",
                   help="write into an --out that already holds other files (never over them)")
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
        try:
            if path.endswith(".toml"):
                try:
                    import tomllib
                except ImportError:  # Python < 3.11
                    raise ValueError(f"--config {path!r}: TOML needs Python 3.11 or later; "
                                     f"write the same keys as JSON") from None
                data = tomllib.load(fh)
            else:
                data = json.load(fh)
        except ValueError as exc:  # JSON, TOML and UTF-8 decoding errors
            raise ValueError(f"--config {path}: not a valid {'TOML' if path.endswith('.toml') else 'JSON'} "
                             f"file ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected an object of option names, got "
                         f"{type(data).__name__}")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown keys in {path}: {unknown}; valid keys: {sorted(DEFAULTS)}")
    return data


def given_options(args: argparse.Namespace) -> dict:
    """The options the user set: the --config file's, overridden by the command line's, in
    their canonical spelling (an alias such as "msmt" or "Market" as its dataset's name,
    --pretrained none as None), as a run saves them."""
    given = read_config_file(args.config) if args.config else {}
    given.update({k: v for k, v in vars(args).items() if k in DEFAULTS})
    if "dataset" in given:
        given["dataset"] = datasets.canonical(given["dataset"])
    if isinstance(given.get("pretrained"), str) and given["pretrained"].lower() == "none":
        given["pretrained"] = None
    return given


def resolve(args: argparse.Namespace) -> dict:
    """DEFAULTS -> PRESETS[dataset] -> config file -> command line; device resolved; a missing
    --out becomes runs/<dataset>-<time> (made unique when the run claims it)."""
    given = given_options(args)  # an alias ("msmt", "Market") gets its dataset's preset
    dataset = given.get("dataset", DEFAULTS["dataset"][0])
    config = {k: v for k, (v, _) in DEFAULTS.items()}
    config.update(PRESETS.get(dataset, {}))
    config.update(given)
    if config["device"] == "auto":
        config["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if config["out"] is None:
        from .rundir import default_out

        config["out"] = default_out(dataset)
    return config


#: what a run saved before an option existed computed, for resuming it
SAVED_BEFORE_OPTION = {"stage1_forward": "per-camera"}


def resume_config(state: dict, config: dict, given: dict) -> dict:
    """The saved config with what may change on resume taken from `given`; raises naming every
    option that cannot change, with the saved and the given value."""
    from .config import flag

    # options newer than the checkpoint: the value its run computed with
    saved = {**SAVED_BEFORE_OPTION, **state["config"]}
    clash = {k: (v, saved.get(k)) for k, v in given.items()
             if k not in RESUMABLE_KEYS and saved.get(k) != v}
    if clash:
        raise ValueError(
            "--resume continues the saved run, whose options cannot change: "
            + "; ".join(f"{flag(k)} {v!r} (saved {s!r})" for k, (v, s) in clash.items())
            + ". Drop them to resume, or start a new run with another --out")
    saved.update({k: config[k] for k in RESUMABLE_KEYS if k in given})
    saved["out"] = config["out"]
    return saved


def open_run_folder(args, config: dict, given: dict, say=print):
    """Rank 0's part before the trainer: a resumed run locks its folder and reads its checkpoint
    (falling back to previous.pt); a new run checks its folder (read only; it is locked just
    before the first checkpoint). Returns (config, state or None, RunFolder)."""
    from .config import check_config
    from .rundir import RunFolder

    folder = RunFolder(config["out"], resume=args.resume, allow_nonempty=args.allow_nonempty_out,
                       claim="out" not in given)
    if not args.resume:
        folder.check()
        return config, None, folder
    folder.acquire()
    state = folder.load_checkpoint(say)
    config = resume_config(state, config, given)
    check_config(config)
    return config, state, folder


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
    from .config import check_config

    args = parse_args(argv)
    config = resolve(args)
    if args.resume and "out" not in given_options(args):
        raise ValueError("--resume needs --out: the folder of the run to continue")
    # every option before anything is read or written (on resume only those given: the rest
    # are the saved run's)
    check_config({k: config[k] for k in given_options(args)} if args.resume else config)
    backend = "nccl" if config["device"].startswith("cuda") else "gloo"
    with D.init_from_env(backend):
        return _train(args, config, hook)


def _train(args, config, hook):
    given = given_options(args)
    say = print if D.is_main() else (lambda *a, **k: None)
    # rank 0 checks --out (and on resume locks it and reads the checkpoint); every rank gets
    # the config and the state
    folder = None

    def prepare():
        nonlocal folder
        config_, state_, folder = open_run_folder(args, config, given, say)
        return config_, state_

    config, state = D.agree(prepare, on_main_only=True)
    try:
        return _run(args, config, state, folder, hook, say)
    finally:
        if folder is not None:
            folder.release()


def _run(args, config, state, folder, hook, say):
    from .trainer import Trainer

    # every check runs before training, on every rank
    trainer = D.agree(lambda: Trainer(config, resume_state=state, hook=hook))
    if not args.resume:  # the folder is taken only now, when nothing is left to check
        out = D.agree(lambda: folder.acquire().out, on_main_only=True)
        trainer.set_out(out)
        config = trainer.config
    if folder is not None:
        trainer.folder = folder
        if folder.removed:
            say(f"removed {len(folder.removed)} temporary file(s) a stopped run left in "
                f"{folder.out}: {', '.join(folder.removed)}")
    say("config:\n" + json.dumps(config, indent=2), flush=True)
    if D.world_size() > 1:
        say(f"{D.world_size()} processes ({torch.distributed.get_backend()})", flush=True)
    if state is not None:
        p = state["progress"]
        say(f"resuming after round {p['round'] + 1} ({p['done'] or 'start'})", flush=True)
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
    from .cli import run

    run(main, interrupted="the run continues from its last checkpoint with the same command "
                          "plus --resume --out <its run folder>")
