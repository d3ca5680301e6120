"""Use a trained model: `python -m iics_fast.extract`.

    # features of every image under a folder (flip-averaged, L2-normalised), with the file list
    python -m iics_fast.extract features runs/x/best.pt IMAGES_DIR --save feats.npy
        -> feats.npy (N, D) float32 and feats.txt (one path a line); a .pt file holds both
    # rank a gallery (a folder, or a saved feature file) for a query image
    python -m iics_fast.extract rank runs/x/best.pt QUERY.jpg GALLERY_DIR_OR_FEATS --top-k 10
    # ranked lists of a few queries of a dataset as a figure (green frame: a true match)
    python -m iics_fast.extract rank runs/x/best.pt --dataset market1501 --root DATA \
        --figure ranked.png --num-queries 6
"""
from __future__ import annotations

import argparse
import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .config import check_device, flag
from .data.transforms import EvalTransform, ImageDataset
from .train import json_object

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_model(checkpoint: str, device: str = "cpu"):
    """The backbone of a training checkpoint (last.pt or best.pt) and its config."""
    from . import models
    from .rundir import read_checkpoint

    if not os.path.isfile(checkpoint):
        raise ValueError(f"checkpoint {checkpoint!r} is not a file")
    state, why = read_checkpoint(checkpoint, keys=("config", "model"))
    if state is None:
        raise ValueError(f"{checkpoint!r} is not an iics_fast training checkpoint ({why}): give "
                         f"the last.pt or best.pt of a run")
    cfg = state["config"]
    model = models.build_backbone(arch=cfg["arch"], init_alpha=cfg["init_alpha"],
                                  last_stride=cfg["last_stride"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a folder of images")
    found = sorted(os.path.join(d, f) for d, _, files in os.walk(folder)
                   for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}")
    return found


@torch.no_grad()
def extract_features(model, paths, height: int, width: int, batch_size: int = 64,
                     device: str = "cpu", workers: int = 0) -> torch.Tensor:
    """Flip-averaged, L2-normalised pooled features of the images at `paths` (float32, CPU)."""
    loader = DataLoader(ImageDataset([(p, -1, -1) for p in paths], EvalTransform(height, width)),
                        batch_size=batch_size, num_workers=workers)
    out = []
    for x, *_ in loader:
        x = x.to(device)
        out.append(F.normalize((model(x) + model(x.flip(3))).float(), dim=1).cpu())
    return torch.cat(out)


def check_paths(paths: list[str]) -> None:
    """A path list must survive the one-path-a-line .txt file: refuse a name holding a line
    break (before any extraction)."""
    bad = next((p for p in paths if "\n" in p or "\r" in p), None)
    if bad is not None:
        raise ValueError(f"the file name {bad!r} holds a line break, which the path list "
                         f"cannot store: rename it, or save to a .pt file")


def save_features(feats: torch.Tensor, paths: list[str], path: str) -> None:
    """Features and their paths, written atomically: a .pt file holding both, or a .npy beside a
    .txt path list (one path a line, file names that are not UTF-8 kept byte for byte). The
    .npy is written in full first, the list replaced only then, and the .npy right after: a
    failure while writing either leaves any previous pair whole (only an interruption between
    the two renames pairs the new list with the old features, which `load_features` refuses
    when their counts differ)."""
    from .checkpoint import atomic_save, write_atomic

    if len(feats) != len(paths):
        raise ValueError(f"{len(feats)} feature rows for {len(paths)} paths")
    if path.endswith(".pt"):
        atomic_save({"features": feats, "paths": list(paths)}, path)
        return
    check_paths(paths)
    buf = io.BytesIO()
    np.save(buf, feats.numpy())
    names = "".join(p + "\n" for p in paths).encode("utf-8", "surrogateescape")
    write_atomic(path, buf.getvalue(),
                 before_replace=lambda: write_atomic(os.path.splitext(path)[0] + ".txt", names))


def load_features(path: str):
    """(features, paths) saved by `save_features`; raises ValueError when the file is not
    readable or its rows and paths do not belong together."""
    if path.endswith(".pt"):
        try:
            data = torch.load(path, map_location="cpu")
            feats, paths = data["features"], list(data["paths"])
        except Exception as exc:
            raise ValueError(f"{path!r} is not a feature file saved by `features` "
                             f"({type(exc).__name__}: {exc})") from None
        names = path
    else:
        names = os.path.splitext(path)[0] + ".txt"
        if not os.path.isfile(names):
            raise ValueError(f"{path!r} has no file list {names!r} beside it")
        with open(names, "rb") as fh:
            paths = fh.read().decode("utf-8", "surrogateescape").splitlines()
        try:
            feats = torch.from_numpy(np.load(path))
        except Exception as exc:
            raise ValueError(f"{path!r} is not a .npy feature file ({exc})") from None
    if feats.ndim != 2 or len(feats) != len(paths):
        raise ValueError(f"{path!r} holds {tuple(feats.shape)} features but {names!r} lists "
                         f"{len(paths)} paths: they do not belong together; extract the "
                         f"features again with `features ... --save {path}`")
    return feats, paths


def parser() -> argparse.ArgumentParser:
    """The command line: `features` and `rank`."""
    p = argparse.ArgumentParser(prog="python -m iics_fast.extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("features", help="features of a folder of images")
    f.add_argument("checkpoint")
    f.add_argument("images", help="folder (searched recursively)")
    f.add_argument("--save", required=True, help="output .npy (+ .txt file list) or .pt")
    r = sub.add_parser("rank", help="rank a gallery for a query image")
    r.add_argument("checkpoint")
    r.add_argument("query", nargs="?", help="query image file (not with --dataset)")
    r.add_argument("gallery", nargs="?",
                   help="gallery folder, or a .npy/.pt saved by `features` (not with --dataset)")
    r.add_argument("--top-k", type=int, default=10)
    r.add_argument("--dataset", help="rank this dataset's queries against its gallery "
                                     "(as `iics_fast.datasets.build` names it)")
    r.add_argument("--root", help="dataset directory")
    r.add_argument("--dataset-options", type=json_object,
                   help="extra options of the dataset, as a JSON object")
    r.add_argument("--figure", help="write the ranked lists as a figure (.png): each query, "
                                    "then its top-k framed green for a true match, red "
                                    "otherwise, grey when the identities are unknown")
    r.add_argument("--num-queries", type=int,
                   help="queries of --dataset in the figure, drawn at random [6]")
    r.add_argument("--seed", type=int, help="seed of the query draw [0]")
    for s in (f, r):
        s.add_argument("--device", default="cpu",
                       help="cpu, cuda, cuda:N, or auto (CUDA when available) [cpu]")
        s.add_argument("--batch-size", type=int, default=64)
    return p


#: the options of `rank --dataset` alone, and their defaults
DATASET_ONLY = {"root": None, "dataset_options": {}, "num_queries": 6, "seed": 0}


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_device(args.device)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.command == "rank":
        given = [k for k in DATASET_ONLY if getattr(args, k) is not None]
        if args.dataset is None and given:
            raise ValueError(f"{', '.join(flag(k) for k in given)}: only for ranking a --dataset; "
                             f"drop them to rank one QUERY against a GALLERY")
        for k, default in DATASET_ONLY.items():
            if getattr(args, k) is None:
                setattr(args, k, default)
        if args.top_k < 1 or args.num_queries < 1:
            raise ValueError(f"--top-k and --num-queries must be >= 1, got {args.top_k} and "
                             f"{args.num_queries}")
    model, cfg = load_model(args.checkpoint, args.device)
    if args.command == "features":
        features_command(model, cfg, args)
    elif args.dataset is not None:
        rank_dataset(model, cfg, args)
    else:
        rank_query(model, cfg, args)


def features_command(model, cfg: dict, args) -> None:
    """`features`: the features of every image under a folder, saved atomically."""
    folder = os.path.dirname(os.path.abspath(args.save))
    if not args.save.endswith((".npy", ".pt")):
        raise ValueError(f"--save {args.save!r}: name a .npy (with a .txt path list beside "
                         f"it) or a .pt file")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--save {args.save!r}: cannot write into {folder}; choose a "
                         f"folder that exists and that you can write into")
    paths = list_images(args.images)
    if not args.save.endswith(".pt"):
        check_paths(paths)
    feats = extract_features(model, paths, cfg["height"], cfg["width"], args.batch_size,
                             args.device)
    save_features(feats, paths, args.save)
    print(f"{len(paths)} images -> {args.save} ({feats.shape[1]}-d)")


def rank_query(model, cfg: dict, args) -> None:
    """`rank QUERY GALLERY`: the top-k gallery images of one query image, printed and, with
    --figure, drawn."""
    if args.query is None or args.gallery is None:
        raise ValueError("rank needs QUERY and GALLERY, or --dataset (with --root)")
    if not os.path.isfile(args.query):
        raise ValueError(f"query {args.query!r} is not a file")
    size = (cfg["height"], cfg["width"])
    if os.path.isfile(args.gallery):
        gf, paths = load_features(args.gallery)
    else:
        paths = list_images(args.gallery)
        gf = extract_features(model, paths, *size, args.batch_size, args.device)
    qf = extract_features(model, [args.query], *size, 1, args.device)
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"gallery features are {gf.shape[1]}-d but the model gives "
                         f"{qf.shape[1]}-d: extract them with this checkpoint")
    from .similarity import normalize_rows  # saved features of any magnitude

    dist = 1.0 - (normalize_rows(gf) @ qf[0])
    order = torch.argsort(dist)[: args.top_k]
    print(f"top {len(order)} of {len(paths)} for {args.query} (cosine distance):")
    for rank, i in enumerate(order.tolist(), 1):
        print(f"{rank:3d}  {dist[i]:.4f}  {paths[i]}")
    if args.figure:
        from .plots import plot_ranked_lists, ranked_lists

        lists = ranked_lists(qf, gf, [(args.query, None, -1)],
                             [(p, None, -1) for p in paths], 1, args.top_k)
        plot_ranked_lists(lists, args.figure, title=os.path.basename(args.query))
        print(f"figure: {args.figure}")


def rank_dataset(model, cfg: dict, args) -> None:
    """Ranked lists of a few of a dataset's queries against its gallery, printed and, with
    --figure, drawn."""
    from . import datasets
    from .plots import plot_ranked_lists, ranked_lists

    if args.query is not None or args.gallery is not None:
        raise ValueError("--dataset ranks the dataset's own query and gallery sets: drop "
                         "QUERY and GALLERY")
    ds = datasets.build(args.dataset, args.root, **args.dataset_options)
    if not ds.query or not ds.gallery:
        raise ValueError(f"dataset {args.dataset!r} has no query or gallery set to rank")
    size = (cfg["height"], cfg["width"])
    qf = extract_features(model, [p for p, _, _ in ds.query], *size, args.batch_size, args.device)
    gf = extract_features(model, [p for p, _, _ in ds.gallery], *size, args.batch_size,
                          args.device)
    lists = ranked_lists(qf, gf, list(ds.query), list(ds.gallery), args.num_queries, args.top_k,
                         args.seed, known=ds.evaluable)
    for (q, ranked) in lists:  # + a true match, - not, ? unknown identities
        hits = "".join("?" if m is None else "+" if m else "-" for _, _, m in ranked)
        who = "" if q[1] is None else f"id {q[1]}, "
        print(f"{q[0]} ({who}camera {q[2] + 1}): {hits}")
    if args.figure:
        plot_ranked_lists(lists, args.figure, title=f"{args.dataset}: {args.checkpoint}")
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    from .cli import run

    run(main)
