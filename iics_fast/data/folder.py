"""Your own camera network: a folder of images, or a CSV, with the camera of every image.

Training is unsupervised, so only the camera is required. Pids are optional; an unknown pid is
-1, and a dataset whose query or gallery has unknown pids is not ``evaluable``.

Sources (``root``, and the optional ``query=`` / ``gallery=``):

* a folder: every image under it (subfolders included). The camera is read from the file name
  with ``camera_regex`` (default ``c(\\d+)``: ``c3_0001.jpg`` -> camera 3);
  a regex containing ``/`` is matched against the path relative to the folder instead, e.g.
  ``r"^cam(\\d+)/"`` for one subfolder a camera. ``pid_regex`` likewise reads the pid.
  If ``root`` has a ``train/`` subfolder, it is the training set and ``query/`` and
  ``gallery/`` beside it (when present) are the test splits.
* a ``.csv`` file with rows ``path,camid[,pid]`` (a header row starting ``path`` is allowed),
  paths relative to the CSV's folder; an empty pid cell is unknown.

Camera labels may be numbers or text; they are renumbered 0.. in numeric (else text) order.
"""
from __future__ import annotations

import csv
import os
import re

from .base import (
    DatasetError, ReidDataset, is_image, list_images, remap_cameras, require_dir,
    require_nonempty, verify_images,
)


def _compile(regex, what: str):
    if regex is None:
        return None
    if not isinstance(regex, str):
        raise DatasetError(f"{what} must be a regular expression as a string, e.g. r'c(\\d+)'; "
                           f"got {regex!r}")
    try:
        pat = re.compile(regex)
    except re.error as exc:
        raise DatasetError(f"{what} {regex!r} is not a valid regular expression: {exc}") from exc
    if pat.groups < 1:
        raise DatasetError(f"{what} {regex!r} needs a capture group, e.g. r'c(\\d+)'")
    return pat


def _label(text: str):
    """Camera label: an int when it is one, else the text."""
    return int(text) if text.strip().lstrip("-").isdigit() else text.strip()


def _from_folder(folder: str, cam_pat, pid_pat) -> list:
    items = []
    for path in list_images(folder, recursive=True):
        rel = os.path.relpath(path, folder).replace(os.sep, "/")
        found = []
        for pat, what in ((cam_pat, "camera_regex"), (pid_pat, "pid_regex")):
            if pat is None:
                found.append(None)
                continue
            m = pat.search(rel if "/" in pat.pattern else os.path.basename(rel))
            if m is None:
                raise DatasetError(f"{what} '{pat.pattern}' does not match {path}; set {what}= "
                                   f"to a pattern with one group that finds it in every name")
            found.append(m.group(1))
        cam, pid = found
        if pid is not None and not pid.lstrip("-").isdigit():
            raise DatasetError(f"pid_regex read {pid!r} from {path}: a pid must be an integer")
        items.append((path, -1 if pid is None else int(pid), _label(cam)))
    return items


def _from_csv(csv_path: str) -> list:
    base = os.path.dirname(os.path.abspath(csv_path))
    items = []
    try:  # utf-8-sig: a byte-order mark (as spreadsheet programs write) is skipped
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        with open(csv_path, "rb") as raw:
            line = raw.read()[:exc.start].count(b"\n") + 1
        raise DatasetError(f"{csv_path}:{line}: the file is not UTF-8 text (byte "
                           f"0x{exc.object[exc.start]:02x}); save it as UTF-8 (e.g. "
                           f"`iconv -f latin1 -t utf-8`)") from None
    seen = {}
    for lineno, row in enumerate(rows, 1):
        row = [c.strip() for c in row]
        if not row or not any(row):
            continue
        if lineno == 1 and row[0].lower() == "path":
            continue
        where = f"{csv_path}:{lineno}"
        if len(row) not in (2, 3) or not row[0] or not row[1]:
            raise DatasetError(f"{where}: expected 'path,camid[,pid]', got {','.join(row)!r}")
        pid = row[2] if len(row) == 3 else ""
        if pid and not pid.lstrip("-").isdigit():
            raise DatasetError(f"{where}: pid {pid!r} is not an integer (leave it empty "
                               f"when unknown)")
        path = row[0] if os.path.isabs(row[0]) else os.path.join(base, row[0])
        if not is_image(path):
            raise DatasetError(f"{where}: {row[0]} is not an image file name "
                               f"(.jpg, .jpeg, .png, .bmp)")
        if not os.path.isfile(path):
            raise DatasetError(f"{where}: image {path} does not exist")
        key = os.path.normpath(path)
        if key in seen:
            raise DatasetError(f"{where}: {row[0]} is listed again (first at line "
                               f"{seen[key]}); list each image once")
        seen[key] = lineno
        items.append((path, int(pid) if pid else -1, _label(row[1])))
    return items


def _read_source(source: str, cam_pat, pid_pat, what: str) -> list:
    if source.lower().endswith(".csv"):
        if not os.path.isfile(source):
            raise DatasetError(f"missing CSV file {source} ({what})")
        items = _from_csv(source)
    else:
        items = _from_folder(require_dir(source, what), cam_pat, pid_pat)
    require_nonempty(items, what, source)
    return items


def load_folder(root: str, *, camera_regex: str = r"c(\d+)", pid_regex: str | None = None,
                query: str | None = None, gallery: str | None = None,
                verify: bool = False) -> ReidDataset:
    """A camera network from ``root`` (folder or CSV); see the module docstring."""
    if root is None:
        raise DatasetError("folder needs root=: a folder of images or a CSV path,camid[,pid]")
    root = os.path.abspath(os.path.expanduser(str(root)))
    cam_pat = _compile(camera_regex, "camera_regex")
    pid_pat = _compile(pid_regex, "pid_regex")
    if cam_pat is None:
        raise DatasetError("camera_regex is required for folders: IICS needs every image's camera")
    train_src = root
    if os.path.isdir(os.path.join(root, "train")):
        train_src = os.path.join(root, "train")
        query = query or (os.path.join(root, "query") if os.path.isdir(
            os.path.join(root, "query")) else None)
        gallery = gallery or (os.path.join(root, "gallery") if os.path.isdir(
            os.path.join(root, "gallery")) else None)
    if (query is None) != (gallery is None):
        raise DatasetError("give both query and gallery (folders or CSVs), or neither")
    base = os.path.dirname(root) if root.lower().endswith(".csv") else root
    splits = [_read_source(train_src, cam_pat, pid_pat, "train")]
    for what, src in (("query", query), ("gallery", gallery)):
        if src is not None:
            src = os.path.join(base, os.path.expanduser(str(src)))
            splits.append(_read_source(src, cam_pat, pid_pat, what))
        else:
            splits.append([])
    splits, cams = remap_cameras(splits)
    if verify:
        for items in splits:
            verify_images(items)
    train, q, g = splits
    return ReidDataset(
        "folder", root, train, q, g, camera_names=cams,
        # the default regex drops the "c" of the file names' c3; a CSV cell is the name itself
        camera_format="c{}" if camera_regex == r"c(\d+)" and not root.lower().endswith(".csv")
        else "{}",
        train_labelled=all(pid != -1 for _, pid, _ in train),
        evaluable=bool(q) and all(pid != -1 for _, pid, _ in q + g),
    )
