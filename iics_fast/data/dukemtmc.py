"""DukeMTMC-reID: the Market-1501 folder layout, file names like ``0005_c2_f0046985.jpg``."""
from __future__ import annotations

import re

from .base import DatasetError, ReidDataset
from .market1501 import read_market_layout

DUKE_PATTERN = re.compile(r"^(-?\d+)_c(\d+)_f\d+\.\w+$")
DUKE_EXAMPLE = "0005_c2_f0046985.jpg (pid_c<camera>_f<frame>)"


def load_dukemtmc(root: str, *, verify: bool = False) -> ReidDataset:
    """DukeMTMC-reID (8 cameras). ``verify`` checks every image header with PIL."""
    if root is None:
        raise DatasetError("dukemtmc needs root=: the folder holding bounding_box_train/")
    return read_market_layout(root, "dukemtmc", DUKE_PATTERN, DUKE_EXAMPLE, range(1, 9), verify)
