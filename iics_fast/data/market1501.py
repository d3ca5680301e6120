"""Market-1501-style layouts: ``bounding_box_train/``, ``query/``, ``bounding_box_test/``.

Read by the ``market1501`` and ``dukemtmc`` loaders, and by ``synthetic`` (which writes this
layout). The pid and camera come from the file name; pid -1 (junk) images are skipped in every
split, pid 0 (distractors) stay (in the gallery, where Market-1501 has them).
"""
from __future__ import annotations

import os
import re

from .base import (
    DatasetError, ReidDataset, list_images, remap_cameras, require_dir, require_nonempty,
    verify_images,
)

SPLIT_DIRS = (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test"))

MARKET_PATTERN = re.compile(r"^(-?\d+)_c(\d+)s\d+_\d+_\d+\.\w+$")
MARKET_EXAMPLE = "0002_c1s1_000451_03.jpg (pid_c<camera>s<sequence>_<frame>_<box>)"


def find_layout_root(root: str, marker: str, what: str) -> str:
    """``root`` if it holds ``marker`` (a folder when it ends in "/"), else its only subfolder
    that does (an unpacked archive such as Market-1501-v15.09.15/)."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    require_dir(root, f"the {what} root")

    def holds(folder):
        return os.path.exists(os.path.join(folder, marker.rstrip("/")))

    if holds(root):
        return root
    inner = [d for d in sorted(os.listdir(root)) if holds(os.path.join(root, d))]
    if len(inner) == 1:
        return os.path.join(root, inner[0])
    raise DatasetError(
        f"{root} is not a {what} folder: expected {marker} in it (or in exactly one of its "
        f"subfolders), found {sorted(os.listdir(root))[:12]}"
    )


def parse_split(folder: str, pattern: re.Pattern, example: str, cameras: range | None) -> list:
    """``(path, pid, raw camera)`` for every image in ``folder``; junk (-1) skipped."""
    items = []
    for path in list_images(folder):
        m = pattern.match(os.path.basename(path))
        if m is None:
            raise DatasetError(f"cannot parse the file name {path}: expected names like {example}")
        pid, cam = int(m.group(1)), int(m.group(2))
        if cameras is not None and cam not in cameras:
            raise DatasetError(
                f"camera c{cam} in {path} is outside the expected c{cameras.start}.."
                f"c{cameras.stop - 1}"
            )
        if pid == -1:
            continue
        if pid < -1:
            raise DatasetError(f"negative pid {pid} in {path}: only -1 (junk) is allowed")
        items.append((path, pid, cam))
    return items


def read_market_layout(root: str, name: str, pattern: re.Pattern = MARKET_PATTERN,
                       example: str = MARKET_EXAMPLE, cameras: range | None = None,
                       verify: bool = False, camera_names: list | None = None) -> ReidDataset:
    """Read a Market-1501-style folder tree into a ReidDataset (cameras renumbered from 0;
    ``camera_names``: the raw camera numbers in camid order, when known in advance)."""
    root = find_layout_root(root, SPLIT_DIRS[0][1] + "/", name)
    splits = []
    for split, sub in SPLIT_DIRS:
        folder = require_dir(os.path.join(root, sub), f"the {split} images of {name}")
        items = parse_split(folder, pattern, example, cameras)
        require_nonempty(items, split, folder)
        splits.append(items)
    splits, cams = remap_cameras(splits, camera_names)
    if verify:
        for items in splits:
            verify_images(items)
    return ReidDataset(name, root, *splits, camera_names=cams, camera_format="c{}")


def load_market1501(root: str, *, verify: bool = False) -> ReidDataset:
    """Market-1501 (6 cameras). ``verify`` checks every image header with PIL."""
    if root is None:
        raise DatasetError("market1501 needs root=: the folder holding bounding_box_train/")
    return read_market_layout(root, "market1501", cameras=range(1, 7), verify=verify)
