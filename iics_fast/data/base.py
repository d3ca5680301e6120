"""The dataset record every loader returns, and the checks loaders share.

A split is a list of ``(path, pid, camid)``: ``path`` an absolute image path, ``pid`` the person
id (``-1`` = unknown, ``0`` = distractor, as in Market-1501), ``camid`` 0-based and consecutive
over the cameras of the whole dataset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from collections.abc import Iterable, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class DatasetError(ValueError):
    """A dataset on disk is missing, laid out differently than expected, or unreadable."""


@dataclass
class ReidDataset:
    """Train / query / gallery splits of a camera network.

    ``train_labelled``: the train pids are true identities (for diagnostics only: training is
    unsupervised); False when they are unknown (all ``-1``).
    ``evaluable``: query and gallery exist and carry pids, so CMC/mAP can be computed.
    ``camera_names``: the dataset's own camera label of each 0-based camid; ``camera_format``
    writes one as the dataset's file names do (``c{}``: Market-1501's ``c3``), see
    ``camera_name``.
    ``info``: loader-specific facts (MSMT17 version, synthetic generation options, ...).
    """

    name: str
    root: str
    train: list
    query: list = field(default_factory=list)
    gallery: list = field(default_factory=list)
    camera_names: list = field(default_factory=list)
    camera_format: str = "{}"
    train_labelled: bool = True
    evaluable: bool = True
    info: dict = field(default_factory=dict)

    @property
    def num_cameras(self) -> int:
        return len(self.camera_names)

    def camera_name(self, camid: int) -> str:
        """Camera ``camid`` (0-based) as the user names it: Market-1501's ``c3``, a folder's
        ``lobby``."""
        return self.camera_format.format(self.camera_names[int(camid)])

    def fingerprint(self) -> str:
        """A digest of the training list (paths relative to the dataset's folder, pids,
        camids, in order): the same dataset moved elsewhere keeps it, any other change of the
        training set does not."""
        import hashlib

        base = self.root if os.path.isdir(self.root) else os.path.dirname(self.root)
        digest = hashlib.sha256()
        for path, pid, cam in self.train:
            rel = os.path.relpath(path, base).replace(os.sep, "/")
            digest.update(f"{rel}\t{pid}\t{cam}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    @property
    def train_cameras(self) -> list:
        """Sorted camids that have at least one training image."""
        return sorted({c for _, _, c in self.train})

    def summary(self) -> str:
        """A small table of ids / images / cameras per split."""
        rows = [("split", "ids", "images", "cameras")]
        for split, items, labelled in (
            ("train", self.train, self.train_labelled),
            ("query", self.query, self.evaluable),
            ("gallery", self.gallery, self.evaluable),
        ):
            if not items and split != "train":
                continue
            ids = str(len({p for _, p, _ in items})) if labelled else "-"
            rows.append((split, ids, str(len(items)), str(len({c for _, _, c in items}))))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"{self.name} at {self.root} ({self.num_cameras} cameras)"]
        for k, r in enumerate(rows):
            lines.append("  " + " | ".join(v.rjust(w) if i else v.ljust(w)
                                           for i, (v, w) in enumerate(zip(r, widths))))
            if k == 0:
                lines.append("  " + "-+-".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"ReidDataset(name={self.name!r}, train={len(self.train)}, "
                f"query={len(self.query)}, gallery={len(self.gallery)}, "
                f"num_cameras={self.num_cameras})")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def require_dir(path: str, what: str) -> str:
    """Return ``path`` if it is a directory, else raise saying what was expected there."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DatasetError(f"{path} is a file, not a folder ({what}); point --root at the "
                           f"dataset's folder")
    if not os.path.isdir(path):
        parent = os.path.dirname(os.path.abspath(path))
        seen = sorted(os.listdir(parent))[:12] if os.path.isdir(parent) else None
        hint = f"; {parent} holds {seen}" if seen is not None else f"; {parent} does not exist"
        raise DatasetError(f"missing folder {path} ({what}){hint}")
    return path


def list_images(folder: str, recursive: bool = False) -> list:
    """Sorted paths of the image files in ``folder`` (optionally in its subfolders too)."""
    if recursive:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            found.extend(os.path.join(dirpath, f) for f in filenames if is_image(f))
        return sorted(found)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if is_image(f))


def remap_cameras(splits: Sequence[list], names: Sequence | None = None) -> tuple:
    """Replace raw camera labels by 0-based consecutive ids over all splits.

    ``names``: the camera labels in camid order when known in advance; by default the labels
    present, sorted numerically when all are integers (a dataset's own camera numbering order)
    and as text otherwise. Returns (new splits, camera labels).
    """
    labels = {c for items in splits for _, _, c in items}
    if names is None:
        names = sorted(labels, key=int if all(_is_int(c) for c in labels) else str)
    names = list(names)
    index = {c: i for i, c in enumerate(names)}
    return [[(p, pid, index[c]) for p, pid, c in items] for items in splits], names


def _is_int(x) -> bool:
    try:
        int(x)
        return True
    except (TypeError, ValueError):
        return False


def require_nonempty(items: list, what: str, where: str) -> None:
    if not items:
        raise DatasetError(f"the {what} split is empty: no usable image in {where}")


def verify_images(items: Iterable) -> None:
    """Check every image header with PIL (cheap: no decoding); raise naming the first bad file."""
    from PIL import Image

    for path, _, _ in items:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as exc:  # PIL raises many types for broken files
            raise DatasetError(f"unreadable image {path}: {exc}") from exc


def read_image(path: str):
    """Open ``path`` as an RGB PIL image, raising DatasetError naming the file if it fails."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise DatasetError(f"cannot read image {path}: {exc}; replace or remove it (the dataset "
                           f"option verify=true checks every image before training)") from exc
