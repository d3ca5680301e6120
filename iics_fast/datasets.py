"""Datasets by name: ``build(name, root, **options)`` and ``names()``.

Every dataset comes back as a ``ReidDataset`` with ``.train``, ``.query``, ``.gallery`` (lists
of ``(path, pid, camid)``, camid 0-based), ``.num_cameras``, ``.name``, ``.summary()``, and
``.train_labelled`` / ``.evaluable`` saying whether the train pids are real and whether
query/gallery can be evaluated. Loader errors are ``DatasetError`` (a ValueError) naming the
file or folder and what was expected there.

    market1501  root holding bounding_box_train/, query/, bounding_box_test/
    dukemtmc    same layout, names like 0005_c2_f0046985.jpg
    msmt17      root holding list_*.txt and train/+test/ (V1) or mask_*_v2/ (V2);
                trains on list_train.txt as the reference does (combine_val=True adds
                list_val.txt, not the reference's), version=None detects V1/V2
    synthetic   generated under root (default $IICS_FAST_CACHE or ~/.cache/iics_fast);
                options num_ids, num_test_ids, num_cameras, cameras_per_id, images_per_camera,
                num_distractors, height, width, seed, image_format
    folder      your own cameras: a folder of images or a CSV ``path,camid[,pid]``

All take ``verify=True`` to check every image header with PIL while loading.
"""
from __future__ import annotations

import inspect

from .data.base import DatasetError, ReidDataset, read_image
from .data.dukemtmc import load_dukemtmc
from .data.folder import load_folder
from .data.market1501 import load_market1501
from .data.msmt17 import load_msmt17
from .data.synthetic import DEFAULTS as SYNTHETIC_DEFAULTS
from .data.synthetic import load_synthetic

__all__ = ["build", "check_options", "names", "DatasetError", "ReidDataset", "read_image"]

_LOADERS = {
    "market1501": load_market1501,
    "dukemtmc": load_dukemtmc,
    "msmt17": load_msmt17,
    "synthetic": load_synthetic,
    "folder": load_folder,
}
_ALIASES = {"market": "market1501", "market-1501": "market1501", "duke": "dukemtmc",
            "dukemtmc-reid": "dukemtmc", "dukemtmcreid": "dukemtmc", "msmt": "msmt17"}


def names() -> list:
    """The dataset names ``build`` accepts (aliases such as "market" and "duke" also work)."""
    return list(_LOADERS)


def canonical(name):
    """The canonical name of dataset ``name`` ("msmt", "MSMT17" -> "msmt17"); a name that is no
    dataset comes back unchanged (``build`` and the config check report it)."""
    if not isinstance(name, str):
        return name
    key = _ALIASES.get(name.lower(), name.lower())
    return key if key in _LOADERS else name


def _loader(name: str):
    """The canonical name and loader of dataset ``name`` (aliases allowed)."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = canonical(name)
    if key not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {names()}")
    return key, _LOADERS[key]


def check_options(name: str, options: dict) -> None:
    """Raise DatasetError if ``name`` is not a dataset or ``options`` holds a name its loader
    does not take (before anything is read or generated)."""
    key, loader = _loader(name)
    known = set(SYNTHETIC_DEFAULTS) | {"verify"} if key == "synthetic" else {
        p for p in inspect.signature(loader).parameters if p != "root"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DatasetError(f"unknown option(s) {unknown} for dataset {key!r}; known: "
                           f"{sorted(known)}")


def build(name: str, root: str | None = None, **options) -> ReidDataset:
    """Load dataset ``name`` from ``root`` with loader ``options`` (see the module docstring)."""
    check_options(name, options)
    return _loader(name)[1](root, **options)
