"""MSMT17, V1 or V2 (detected from the folders present).

Layout: ``list_train.txt``, ``list_val.txt``, ``list_query.txt``, ``list_gallery.txt`` with one
``relative/path.jpg pid`` a line; train/val paths are relative to ``train/`` (V1) or
``mask_train_v2/`` (V2), query/gallery paths to ``test/`` or ``mask_test_v2/``. The camera is
the third ``_`` field of the file name (``0000_000_01_0303morning_0015_0.jpg`` -> camera 1,
cameras 1..15). Train and test pids are separate numberings (different people); pid 0 is a
real person here, not a distractor.
"""
from __future__ import annotations

import os

from .base import DatasetError, ReidDataset, remap_cameras, require_nonempty, verify_images
from .market1501 import find_layout_root

VERSIONS = {1: ("train", "test"), 2: ("mask_train_v2", "mask_test_v2")}
NAME_EXAMPLE = "0000_000_01_0303morning_0015_0.jpg (pid_index_<camera>_...)"


def _detect_version(root: str, version) -> int:
    found = [v for v, dirs in VERSIONS.items()
             if all(os.path.isdir(os.path.join(root, d)) for d in dirs)]
    if version is not None:
        if version not in VERSIONS:
            raise DatasetError(f"msmt17 version must be 1, 2 or None (detect), got {version!r}")
        if version not in found:
            raise DatasetError(f"msmt17 V{version} needs folders {'/ and '.join(VERSIONS[version])}/ "
                               f"in {root}")
        return version
    if len(found) == 1:
        return found[0]
    if not found:
        raise DatasetError(f"{root} has the MSMT17 lists but neither train/+test/ (V1) nor "
                           f"mask_train_v2/+mask_test_v2/ (V2) image folders")
    raise DatasetError(f"{root} holds both MSMT17 V1 and V2 image folders: pass version=1 or 2")


def _read_list(list_path: str, image_dir: str) -> list:
    """``(path, pid, raw camera)`` for each line of an MSMT17 list file."""
    if not os.path.isfile(list_path):
        raise DatasetError(f"missing MSMT17 list file {list_path}")
    items = []
    with open(list_path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{list_path}:{lineno}"
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DatasetError(f"{where}: expected 'relative/path.jpg pid', got {line.strip()!r}")
            name = os.path.basename(parts[0])
            fields = name.split("_")
            if len(fields) < 3 or not fields[2].isdigit() or not 1 <= int(fields[2]) <= 15:
                raise DatasetError(f"{where}: cannot read the camera from {name}: expected names "
                                   f"like {NAME_EXAMPLE} with camera 1..15")
            items.append((os.path.join(image_dir, parts[0]), int(parts[1]), int(fields[2])))
    missing = [p for p, _, _ in items if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{len(missing)} images listed in {list_path} are missing, e.g. "
                           f"{missing[0]}")
    return items


def load_msmt17(root: str, *, combine_val: bool = False, version: int | None = None,
                verify: bool = False) -> ReidDataset:
    """MSMT17. Trains on list_train.txt (30,248 images in V2), as the reference does;
    ``combine_val=True`` adds list_val.txt (32,621 images: not the reference's training set);
    ``version`` forces V1/V2 (default: detect); ``verify`` checks image headers with PIL."""
    if root is None:
        raise DatasetError("msmt17 needs root=: the folder holding list_train.txt")
    root = find_layout_root(root, "list_train.txt", "msmt17")
    v = _detect_version(root, version)
    train_dir, test_dir = (os.path.join(root, d) for d in VERSIONS[v])
    train = _read_list(os.path.join(root, "list_train.txt"), train_dir)
    if combine_val:
        train = train + _read_list(os.path.join(root, "list_val.txt"), train_dir)
    query = _read_list(os.path.join(root, "list_query.txt"), test_dir)
    gallery = _read_list(os.path.join(root, "list_gallery.txt"), test_dir)
    for split, items, lst in (("train", train, "list_train.txt"), ("query", query, "list_query.txt"),
                              ("gallery", gallery, "list_gallery.txt")):
        require_nonempty(items, split, os.path.join(root, lst))
    splits, cams = remap_cameras([train, query, gallery])
    if verify:
        for items in splits:
            verify_images(items)
    return ReidDataset("msmt17", root, *splits, camera_names=cams,
                       info={"version": v, "combine_val": bool(combine_val)})
