"""Training and test input pipelines (PIL + torch, no torchvision) and the image Dataset.

Randomness is explicit: every random transform draws from a NumPy Generator seeded per sample by
the sampler (see `iics_fast.data.samplers`), so an epoch's augmentations depend only on
(seed, epoch), not on the number of DataLoader workers or on what ran before.

Train: resize (bicubic) -> random horizontal flip -> pad 10 + random crop -> to tensor ->
ImageNet normalisation -> random erasing (p 0.5, area 0.02-0.4, aspect 0.3-1/0.3, the
reference's fill ERASING_FILL written into the normalised tensor).
Test:  resize (bicubic) -> to tensor -> ImageNet normalisation.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: what the reference's RandomErasing writes into the already-normalised tensor, per channel
ERASING_FILL = (0.4914, 0.4822, 0.4465)


def load_image(path: str) -> Image.Image:
    """Open an image file as RGB, with a clear error when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path!r}: {exc}; check the dataset root") from exc


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 tensor (3, H, W) in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Per-channel (x - mean) / std on a (3, H, W) tensor, in place."""
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return x.sub_(m).div_(s)


def random_erasing(x: torch.Tensor, rng: np.random.Generator, p: float = 0.5,
                   area: tuple[float, float] = (0.02, 0.4), min_aspect: float = 0.3,
                   value=ERASING_FILL, attempts: int = 100) -> torch.Tensor:
    """Random erasing (Zhong et al.): with probability p, fill one random rectangle of the
    normalised image with `value` (per channel, or one number for all; the default is the
    reference's, 0 would be the ImageNet mean colour). The rectangle covers a
    fraction U(area) of the image with aspect ratio h/w in [min_aspect, 1/min_aspect]; up to
    `attempts` draws are tried until one fits. Works in place on (3, H, W)."""
    if rng.random() >= p:
        return x
    _, h_img, w_img = x.shape
    total = h_img * w_img
    for _ in range(attempts):
        target = rng.uniform(area[0], area[1]) * total
        aspect = rng.uniform(min_aspect, 1.0 / min_aspect)
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < h_img and 0 < w < w_img:
            top = int(rng.integers(0, h_img - h + 1))
            left = int(rng.integers(0, w_img - w + 1))
            fill = torch.as_tensor(value, dtype=x.dtype).reshape(-1, 1, 1)
            x[:, top:top + h, left:left + w] = fill
            return x
    return x


class EvalTransform:
    """Test-time pipeline: resize (bicubic) to (height, width), to tensor, normalisation."""

    def __init__(self, height: int, width: int):
        self.size = (int(height), int(width))

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        h, w = self.size
        if img.size != (w, h):
            img = img.resize((w, h), Image.BICUBIC)
        return normalize(to_tensor(img))


class TrainTransform:
    """The training augmentation of the reference pipeline (see the module docstring)."""

    def __init__(self, height: int, width: int, pad: int = 10, flip_p: float = 0.5,
                 erasing_p: float = 0.5, erasing_area: tuple[float, float] = (0.02, 0.4),
                 erasing_min_aspect: float = 0.3):
        self.size = (int(height), int(width))
        self.pad, self.flip_p = int(pad), float(flip_p)
        self.erasing = dict(p=float(erasing_p), area=tuple(erasing_area),
                            min_aspect=float(erasing_min_aspect))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        h, w = self.size
        if img.size != (w, h):
            img = img.resize((w, h), Image.BICUBIC)
        x = to_tensor(img)
        if rng.random() < self.flip_p:
            x = x.flip(2)
        if self.pad > 0:
            x = torch.nn.functional.pad(x, (self.pad,) * 4)  # zero padding, like PIL/TV Pad(10)
            top = int(rng.integers(0, 2 * self.pad + 1))
            left = int(rng.integers(0, 2 * self.pad + 1))
            x = x[:, top:top + h, left:left + w].contiguous()
        x = normalize(x)
        return random_erasing(x, rng, **self.erasing)


class ImageDataset(torch.utils.data.Dataset):
    """Images of `(path, label, camid)` items through a transform.

    An item is fetched by an int index (no randomness: the test transform) or by an
    `(index, sample_seed)` pair from the samplers, which seeds the transform's Generator.
    Returns `(image, label, camid, index)`.
    """

    def __init__(self, items: Sequence[tuple], transform):
        self.items = [(str(p), int(l), int(c)) for p, l, c in items]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            index, sample_seed = int(key[0]), int(key[1])
            rng = np.random.default_rng(sample_seed)
        else:
            index, rng = int(key), np.random.default_rng(0)
        path, label, camid = self.items[index]
        return self.transform(load_image(path), rng), label, camid, index
