"""Source pretraining of the synthetic demo: `python -m iics_fast.pretrain --out FILE`.

The paper starts IICS from ImageNet weights; none can be downloaded here, and a backbone from
random initialisation does not learn person features in the few steps a CPU demo affords. The
demo gives the backbone a start of the same kind: supervised training on a *source* population
drawn by the synthetic generator with another seed, so other identities under other camera
styles. The target network's labels are never used for training. The weights are written as a
torchvision-format state dict (no AIBN alphas, like an ImageNet file), so `--pretrained FILE`
takes them as it takes ImageNet weights. `--pretrained synthetic-source` means this file for
the run's arch and input size, trained on first use and cached under ``$IICS_FAST_CACHE``
(written to a temporary name and renamed, so a killed run leaves no half-written file).

Training: PK batches of the source identities, cross-entropy on a BN-neck head (classification
only, as ImageNet weights are trained; `--triplet-weight` adds the batch-hard triplet loss),
SGD with momentum and a cosine learning-rate decay, the training augmentation of the trainer;
bf16 autocast where the CPU computes it natively (two thirds of float32's CPU time there, with
as good a start: docs/demo.md), float32 elsewhere. Without the triplet term the pooled
features' directions spread 11-13x more (docs/demo.md), so that the cosine term of Eq. 5
counts beside the Jaccard term, as it does from ImageNet weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .checkpoint import atomic_save, derive_seed
from .config import check_input_size, flag
from .losses import batch_hard_triplet

#: the `--pretrained` value that names the cached source weights
SOURCE_NAME = "synthetic-source"

#: the source population: disjoint from any target drawn with another seed (other identities,
#: other camera styles); test ids and distractors are not used
SOURCE_DATA = {"num_ids": 300, "num_cameras": 8, "cameras_per_id": [2, 4],
               "images_per_camera": [1, 2], "num_test_ids": 1, "num_distractors": 0,
               "camera_strength": 0.5, "seed": 1000}

#: training settings of the source backbone
SOURCE_TRAINING = {"epochs": 24, "batch_p": 16, "batch_k": 4, "optimizer": "sgd",
                   "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "margin": 0.3, "triplet_weight": 0.0,
                   "seed": 0, "amp": "bf16"}

# Bump when the source training changes, so that older cached weights are not reused.
SOURCE_VERSION = 2


def _precision(training: dict) -> torch.dtype | None:
    """The autocast dtype of the source training on this CPU (None: float32)."""
    from .models import amp_dtype

    return amp_dtype(training.get("amp", "off"), torch.device("cpu"))


def _spec(arch: str, height: int, width: int, data: dict, training: dict) -> dict:
    # the precision this CPU trains in is part of the key: weights trained in bf16 on one
    # machine are not those trained in float32 on another
    return {"version": SOURCE_VERSION, "arch": arch, "height": int(height), "width": int(width),
            "data": data, "training": training, "precision": str(_precision(training))}


def source_path(arch: str, height: int, width: int, cache_dir: str | None = None,
                data: dict | None = None, training: dict | None = None) -> str:
    """Where the cached source weights of this arch / input size / settings live."""
    from .data.synthetic import default_cache_dir

    spec = json.dumps(_spec(arch, height, width, data or SOURCE_DATA,
                            {**SOURCE_TRAINING, **(training or {})}), sort_keys=True)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    return os.path.join(cache_dir, f"source-{arch}-{height}x{width}-"
                                   f"{hashlib.sha1(spec.encode()).hexdigest()[:12]}.pth")


def train_source(arch: str, height: int, width: int, data: dict | None = None,
                 training: dict | None = None, cache_dir: str | None = None,
                 log=print) -> dict:
    """Train the backbone with labels on the source population; returns its state dict in
    torchvision format (AIBN alphas left out)."""
    from . import datasets, models
    from .data.samplers import PKBatchSampler
    from .data.transforms import ImageDataset, TrainTransform

    data = dict(SOURCE_DATA if data is None else data)
    t = {**SOURCE_TRAINING, **(training or {})}
    ds = datasets.build("synthetic", cache_dir, **data)
    items = list(ds.train)
    labels = np.unique([pid for _, pid, _ in items], return_inverse=True)[1]
    items = [(p, int(y), c) for (p, _, c), y in zip(items, labels)]
    torch.manual_seed(derive_seed(t["seed"], 0))
    model = models.build_backbone(arch=arch)
    head = models.ClassifierHead(model.out_dim, int(labels.max()) + 1)
    sampler = PKBatchSampler(labels, t["batch_p"], t["batch_k"], seed=derive_seed(t["seed"], 1))
    loader = DataLoader(ImageDataset(items, TrainTransform(height, width)),
                        batch_sampler=sampler, num_workers=0)
    params = [p for m in (model, head) for p in m.parameters() if p.requires_grad]
    if t["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
    elif t["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=t["lr"], momentum=t["momentum"],
                              weight_decay=t["weight_decay"], nesterov=True)
    else:
        raise ValueError(f"source optimizer must be 'adamw' or 'sgd', got {t['optimizer']!r}")
    steps = t["epochs"] * len(sampler)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + np.cos(np.pi * min(s, steps) / steps)))
    model.train()
    head.train()
    dtype = _precision(t)
    tic = time.perf_counter()
    for epoch in range(t["epochs"]):
        sampler.set_epoch(epoch)
        ce_sum = tri_sum = 0.0
        correct = seen = 0
        for x, y, _, _ in loader:
            with models.autocast(dtype, torch.device("cpu")):
                f = model(x)
                logits = head(f)
            f, logits = f.float(), logits.float()
            loss = ce = F.cross_entropy(logits, y)
            if t["triplet_weight"]:
                tri = batch_hard_triplet(f, y, t["margin"])
                loss = ce + t["triplet_weight"] * tri
                tri_sum += tri.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ce_sum += ce.item()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        n = len(sampler)
        triplet = f"triplet {tri_sum / n:.3f}, " if t["triplet_weight"] else ""
        log(f"source pretraining epoch {epoch + 1}/{t['epochs']}: CE {ce_sum / n:.3f}, "
            f"{triplet}acc {correct / max(1, seen):.1%} "
            f"({time.perf_counter() - tic:.0f}s)")
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith(".alpha")}


def source_weights(arch: str, height: int, width: int, cache_dir: str | None = None,
                   log=print) -> str:
    """The path of the cached source weights for (arch, height, width), trained first if
    they are not cached yet."""
    path = source_path(arch, height, width, cache_dir)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log(f"source pretraining of {arch} at {height}x{width} (first use; cached as {path})")
    atomic_save(train_source(arch, height, width, cache_dir=cache_dir, log=log), path)
    return path


def check_args(args, p: argparse.ArgumentParser) -> None:
    """Refuse an unwritable --out or an option value that cannot work, before any training
    (a ValueError: `error: ...` and exit status 2 under `iics_fast.cli.run`)."""
    folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a folder: name the weights file, e.g. "
                         f"{os.path.join(args.out, 'source.pth')}")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out!r}: cannot write into {folder}; choose a folder "
                         f"that exists and that you can write into")
    checks = [("epochs", "an integer >= 1", args.epochs >= 1),
              ("height", "an integer >= 1", args.height >= 1),
              ("width", "an integer >= 1", args.width >= 1),
              ("threads", "an integer >= 1", args.threads is None or args.threads >= 1),
              ("lr", "a finite number > 0", math.isfinite(args.lr) and args.lr > 0),
              ("triplet_weight", "a finite number >= 0",
               math.isfinite(args.triplet_weight) and args.triplet_weight >= 0),
              ("camera_strength", "a number in [0, 1]", 0 <= args.camera_strength <= 1)]
    for key, rule, ok in checks:
        if not ok:
            name, default = flag(key), p.get_default(key)
            example = "" if default is None else f", e.g. the default {name} {default}"
            raise ValueError(f"{name} {getattr(args, key)} is out of range: give {rule}{example}")
    check_input_size(args.height, args.width, 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m iics_fast.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output state dict file (.pth)")
    p.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50"))
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=SOURCE_TRAINING["epochs"])
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=SOURCE_TRAINING["optimizer"])
    p.add_argument("--lr", type=float, default=SOURCE_TRAINING["lr"])
    p.add_argument("--triplet-weight", type=float, default=SOURCE_TRAINING["triplet_weight"],
                   help="weight of the batch-hard triplet loss beside the cross-entropy (default: 0, "
                        "classification only)")
    p.add_argument("--camera-strength", type=float, default=SOURCE_DATA["camera_strength"])
    p.add_argument("--amp", choices=("bf16", "off"), default=SOURCE_TRAINING["amp"],
                   help="bf16 autocast where the CPU computes it natively, else float32 (default: bf16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of torch")
    args = p.parse_args(argv)
    check_args(args, p)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = {**SOURCE_DATA, "camera_strength": args.camera_strength}
    training = {"epochs": args.epochs, "optimizer": args.optimizer, "lr": args.lr,
                "triplet_weight": args.triplet_weight, "amp": args.amp}
    state = train_source(args.arch, args.height, args.width, data=data, training=training)
    atomic_save(state, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from .cli import run

    run(main)
