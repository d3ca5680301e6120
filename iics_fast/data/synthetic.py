"""A procedurally drawn multi-camera re-ID set, deterministic by seed.

Each identity has an appearance: upper-body colour and pattern (plain, horizontal or vertical
stripes, checks) with a second colour, lower-body colour and cut (trousers or shorts), skin and
hair tones, body height / width / torso proportion, maybe a bag on one side. Each camera has a
style: a scene behind the people (wall colour and texture, floor colour), a per-channel colour
cast, brightness, contrast, blur, sensor noise, and a viewpoint (horizontal offset, scale,
mirror). Each image adds its own pose (shift, scale, stride), a crop of the camera's scene, a
small illumination change and, sometimes, an occluding patch.

The camera style is deliberately strong: in raw colour statistics, two different people under
the same camera look more alike than one person under two cameras (the tests check this). That is
the situation IICS is built for: clustering within a camera is reliable, clustering across
cameras on raw similarity is not. Identity stays recoverable: it is carried by the colour
*relations*, the pattern, the proportions and the bag, which every camera keeps.

Images are written once as JPEG (or PNG) files in the Market-1501 layout under a cache folder
keyed by the options, through a temporary folder renamed into place (a killed generation leaves
no half-written set), then read back by the Market-1501 reader. Pids: 1..num_ids train,
num_ids+1..num_ids+num_test_ids test, 0 for gallery distractors.
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from .base import DatasetError, ReidDataset
from .market1501 import SPLIT_DIRS, read_market_layout

# Bump when the drawing changes, so cached sets drawn by older code are not reused.
GENERATOR_VERSION = 1

DEFAULTS = {
    "num_ids": 100,            # training identities
    "num_test_ids": 50,        # query/gallery identities (disjoint from training)
    "num_cameras": 6,
    "cameras_per_id": (2, None),  # each id is seen by lo..hi cameras (None = num_cameras)
    "images_per_camera": (1, 4),  # images per (id, camera): an int or an inclusive range
    "num_distractors": 100,    # pid-0 gallery images of people seen nowhere else
    "height": 128,
    "width": 64,
    "seed": 0,
    "image_format": "jpg",     # "jpg" or "png"
    "camera_strength": 1.0,    # scales how far each camera's colour cast, brightness and
                               # contrast depart from neutral (0: none; 1: the full effect)
}


def default_cache_dir() -> str:
    """``$IICS_FAST_CACHE`` or ``~/.cache/iics_fast``."""
    return os.environ.get("IICS_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "iics_fast")


def _range(value, name: str, low: int, high: int | None = None) -> tuple:
    """An int or (lo, hi) option as a checked inclusive (lo, hi)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        lo = hi = int(value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        lo, hi = value
        hi = high if hi is None else hi
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (lo, hi)):
            raise DatasetError(f"{name} must be an int or a pair of ints, got {value!r}")
        lo, hi = int(lo), int(hi)
    else:
        raise DatasetError(f"{name} must be an int or a pair (lo, hi) of ints, got {value!r}")
    if lo < low or hi < lo or (high is not None and hi > high):
        top = "" if high is None else f" and <= {high}"
        raise DatasetError(f"{name} = {value!r}: need {low} <= lo <= hi{top}")
    return lo, hi


def synthetic_options(**options) -> dict:
    """Defaults filled in and every option checked; unknown names raise."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown synthetic option(s) {unknown}; known: {sorted(DEFAULTS)}")
    opt = {**DEFAULTS, **options}
    for key, low in (("num_ids", 1), ("num_test_ids", 1), ("num_cameras", 2),
                     ("num_distractors", 0), ("height", 32), ("width", 16), ("seed", 0)):
        v = opt[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise DatasetError(f"synthetic option {key} must be an int >= {low}, got {v!r}")
        opt[key] = int(v)
    opt["cameras_per_id"] = _range(opt["cameras_per_id"], "cameras_per_id", 2, opt["num_cameras"])
    opt["images_per_camera"] = _range(opt["images_per_camera"], "images_per_camera", 1)
    strength = opt["camera_strength"]
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
            0.0 <= strength <= 1.0):
        raise DatasetError(f"camera_strength must be a number in [0, 1], got {strength!r}")
    opt["camera_strength"] = float(strength)
    if opt["image_format"] not in ("jpg", "png"):
        raise DatasetError(f"image_format must be 'jpg' or 'png', got {opt['image_format']!r}")
    return opt


# ----------------------------------------------------------------------------- appearance
def _rgb(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _random_colour(rng) -> np.ndarray:
    """A clothing-like colour: any hue, often muted, sometimes dark or light."""
    return _rgb(rng.random(), rng.uniform(0.15, 1.0), rng.uniform(0.15, 1.0))


def _identity(seed: int, pid: int) -> dict:
    rng = np.random.default_rng([seed, 1, pid])
    upper = _random_colour(rng)
    second = _random_colour(rng)
    return {
        "upper": upper,
        "pattern": int(rng.choice(4, p=[0.4, 0.25, 0.15, 0.2])),  # plain, h-stripes, v-stripes, checks
        "second": second,
        "period": rng.uniform(0.03, 0.06),  # pattern period, in body heights
        "lower": _random_colour(rng),
        "shorts": bool(rng.random() < 0.25),
        "skin": _rgb(rng.uniform(0.03, 0.1), rng.uniform(0.25, 0.6), rng.uniform(0.35, 0.95)),
        "hair": _rgb(rng.uniform(0.0, 0.12), rng.uniform(0.2, 0.7), rng.uniform(0.05, 0.6)),
        "shoes": _rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.05, 0.5)),
        "height": rng.uniform(0.78, 0.94),  # of the image height
        "build": rng.uniform(0.8, 1.25),    # width factor
        "torso": rng.uniform(0.34, 0.44),   # torso share of the body height
        "bag": bool(rng.random() < 0.35),
        "bag_colour": _random_colour(rng),
        "bag_side": 1 if rng.random() < 0.5 else -1,
    }


def _camera(seed: int, cam: int, h: int, w: int, strength: float = 1.0) -> dict:
    rng = np.random.default_rng([seed, 2, cam])
    yy = np.arange(h, dtype=np.float32)[:, None] / h
    xx = np.arange(3 * w, dtype=np.float32)[None, :] / w
    wall = _rgb(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.95))
    floor = _rgb(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.2, 0.8))
    kind = rng.integers(3)
    amp = rng.uniform(0.08, 0.2)
    if kind == 0:  # wall panels
        tex = np.sign(np.sin(2 * np.pi * xx / rng.uniform(0.3, 0.7))) * np.ones_like(yy)
    elif kind == 1:  # horizontal bands
        tex = np.sin(2 * np.pi * yy / rng.uniform(0.1, 0.25)) * np.ones_like(xx)
    else:  # blotches: coarse noise, upsampled
        coarse = rng.standard_normal((h // 8 + 1, 3 * w // 8 + 1)).astype(np.float32)
        tex = np.kron(coarse, np.ones((8, 8), np.float32))[:h, : 3 * w] / 1.5
    scene = np.where((yy > rng.uniform(0.62, 0.8))[..., None], floor, wall)
    scene = scene * (1 + amp * tex[..., None])
    return {
        "scene": scene.astype(np.float32),
        "gain": (1 + strength * (rng.uniform(0.55, 1.45, 3) - 1)).astype(np.float32),  # cast
        "brightness": strength * rng.uniform(-0.12, 0.12),
        "contrast": 1 + strength * (rng.uniform(0.65, 1.25) - 1),
        "blur": int(rng.integers(0, 3)) * max(1, h // 128),
        "noise": rng.uniform(0.01, 0.05),
        "shift": rng.uniform(-0.1, 0.1),  # person's horizontal offset, in image widths
        "scale": rng.uniform(0.85, 1.05),
        "mirror": bool(rng.random() < 0.5),
    }


# ----------------------------------------------------------------------------- drawing
def _box_blur(img: np.ndarray, r: int) -> np.ndarray:
    """Separable (2r+1)-wide box filter with edge padding."""
    if r <= 0:
        return img
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (r + 1, r)
        c = np.cumsum(np.pad(img, pad, mode="edge"), axis=axis)
        n = img.shape[axis]
        img = (np.take(c, np.arange(2 * r + 1, n + 2 * r + 1), axis=axis)
               - np.take(c, np.arange(0, n), axis=axis)) / (2 * r + 1)
    return img


def _paint(img: np.ndarray, mask, colour) -> None:
    """Set the pixels of ``img`` under ``mask`` (broadcast to the image) to ``colour``."""
    img[np.broadcast_to(mask, img.shape[:2])] = colour


def _paint_legs(img, ident: dict, rng, yy, dx, u, top, feet):
    """Legs apart by a random stride, skin below the knee for shorts, shoes; returns the waist."""
    waist = top + u * (0.13 + ident["torso"])
    stride = u * rng.uniform(0.0, 0.06)
    b = ident["build"]
    leg_hw = 0.055 * u * b
    legs = (yy >= waist) & (yy < feet) & (
        (np.abs(dx - 0.05 * u * b - stride / 2) < leg_hw) | (np.abs(dx + 0.05 * u * b + stride / 2) < leg_hw))
    _paint(img, legs, ident["lower"])
    if ident["shorts"]:
        _paint(img, legs & (yy > waist + 0.45 * (feet - waist)), ident["skin"])
    _paint(img, legs & (yy > feet - 0.04 * u), ident["shoes"])
    return waist


def _second_colour(pattern: int, yy, dx, shoulder, p, shape):
    """Where the upper body shows its second colour: none, stripes across, stripes down, checks."""
    if pattern == 0:
        return np.zeros(shape, bool)
    if pattern == 1:
        return np.floor((yy - shoulder) / p) % 2 == 1
    if pattern == 2:
        return np.floor(dx / p) % 2 == 1
    return (np.floor((yy - shoulder) / p) + np.floor(dx / p)) % 2 == 1


def _paint_upper(img, ident: dict, yy, dx, u, top, waist):
    """Torso and sleeves in the upper colour and pattern, hands in skin; returns the torso's
    half width."""
    shoulder = top + 0.13 * u
    thw = 0.13 * u * ident["build"]
    torso = (yy >= shoulder) & (yy < waist + 0.02 * u) & (np.abs(dx) < thw)
    arms = (yy >= shoulder + 0.01 * u) & (yy < shoulder + 0.34 * u) & (np.abs(dx) >= thw) & (
        np.abs(dx) < thw + 0.05 * u)
    upper = torso | arms
    p = max(2.0, ident["period"] * u)
    second = _second_colour(ident["pattern"], yy, dx, shoulder, p, upper.shape)
    _paint(img, upper, ident["upper"])
    _paint(img, upper & second, ident["second"])
    hands = (yy >= shoulder + 0.34 * u) & (yy < shoulder + 0.39 * u) & (np.abs(dx) >= thw) & (
        np.abs(dx) < thw + 0.05 * u)
    _paint(img, hands, ident["skin"])
    return thw


def _paint_head_and_bag(img, ident: dict, yy, dx, u, top, waist, thw) -> None:
    """The head with hair on its top, then the bag (if any) at the hip on the identity's side."""
    b = ident["build"]
    hy, ry, rx = top + 0.065 * u, 0.065 * u, 0.05 * u * min(b, 1.1)
    head = ((dx / rx) ** 2 + ((yy - hy) / ry) ** 2) <= 1.0
    _paint(img, head, ident["skin"])
    _paint(img, head & (yy < hy - 0.3 * ry), ident["hair"])
    if ident["bag"]:
        bx = ident["bag_side"] * dx
        bag = (bx >= thw - 0.02 * u) & (bx < thw + 0.11 * u) & (yy >= waist - 0.12 * u) & (
            yy < waist + 0.08 * u)
        _paint(img, bag, ident["bag_colour"])


def _draw(ident: dict, cam: dict, rng, h: int, w: int) -> np.ndarray:
    """One (h, w, 3) uint8 image of ``ident`` seen by ``cam``: a random crop of the camera's
    scene, the person placed at a random size and position, then the camera's effects."""
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    off = rng.integers(0, 2 * w)
    img = cam["scene"][:, off : off + w].copy()

    u = h * ident["height"] * cam["scale"] * rng.uniform(0.94, 1.06)  # body height, pixels
    feet = h * (0.985 + rng.uniform(-0.03, 0.0))
    top = feet - u
    cx = w * (0.5 + cam["shift"] + rng.uniform(-0.06, 0.06))
    dx = xx - cx
    waist = _paint_legs(img, ident, rng, yy, dx, u, top, feet)
    thw = _paint_upper(img, ident, yy, dx, u, top, waist)
    _paint_head_and_bag(img, ident, yy, dx, u, top, waist, thw)
    return _camera_effects(img, cam, rng, h, w)


def _camera_effects(img: np.ndarray, cam: dict, rng, h: int, w: int) -> np.ndarray:
    """The camera's view of a drawn scene: mirror, an occluder now and then, gain, contrast,
    brightness, blur and noise; uint8 (h, w, 3)."""
    if cam["mirror"]:
        img = img[:, ::-1]
    if rng.random() < 0.3:  # occluder: a patch of random colour entering from a side or below
        oh, ow = int(h * rng.uniform(0.15, 0.45)), int(w * rng.uniform(0.25, 0.6))
        y0 = rng.integers(0, h - oh + 1) if rng.random() < 0.5 else h - oh
        x0 = 0 if rng.random() < 0.5 else w - ow
        img[y0 : y0 + oh, x0 : x0 + ow] = _random_colour(rng)

    img = img * cam["gain"] * rng.uniform(0.95, 1.05)
    img = (img - 0.5) * cam["contrast"] + 0.5 + cam["brightness"]
    img = _box_blur(img, cam["blur"])
    img = img + rng.normal(0.0, cam["noise"], img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _plan(opt: dict) -> list:
    """Every image as (split, pid, camera 0-based), in a fixed order."""
    rng = np.random.default_rng([opt["seed"], 0])
    c = opt["num_cameras"]
    (clo, chi), (ilo, ihi) = opt["cameras_per_id"], opt["images_per_camera"]
    plan = []
    for pid in range(1, opt["num_ids"] + opt["num_test_ids"] + 1):
        cams = np.sort(rng.choice(c, size=rng.integers(clo, chi + 1), replace=False))
        counts = rng.integers(ilo, ihi + 1, size=len(cams))
        if pid <= opt["num_ids"]:
            plan += [("train", pid, int(k)) for k, n in zip(cams, counts) for _ in range(n)]
            continue
        # Query: the first image of the id in about half its cameras, never all of them, so
        # each query keeps a match under another camera in the gallery.
        qcams = set(rng.choice(cams, size=max(1, len(cams) // 2), replace=False).tolist())
        for k, n in zip(cams, counts):
            for i in range(n):
                plan.append(("query" if (i == 0 and int(k) in qcams) else "gallery", pid, int(k)))
    plan += [("gallery", 0, int(k)) for k in rng.integers(0, c, size=opt["num_distractors"])]
    return plan


def render_synthetic(**options):
    """Draw the set in memory: (images uint8 (N, H, W, 3), [(split, pid, camid)] of length N).

    Distractor j (pid 0) has its own appearance, drawn from identity number
    ``num_ids + num_test_ids + 1 + j``.
    """
    opt = synthetic_options(**options)
    h, w, seed = opt["height"], opt["width"], opt["seed"]
    plan = _plan(opt)
    cams = [_camera(seed, k, h, w, opt["camera_strength"]) for k in range(opt["num_cameras"])]
    idents = {}
    images = np.empty((len(plan), h, w, 3), np.uint8)
    first_distractor = opt["num_ids"] + opt["num_test_ids"] + 1
    j = 0
    for n, (_, pid, cam) in enumerate(plan):
        key = pid if pid else first_distractor + j
        j += pid == 0
        if key not in idents:
            idents[key] = _identity(seed, key)
        images[n] = _draw(idents[key], cams[cam], np.random.default_rng([seed, 3, n]), h, w)
    return images, plan


def make_synthetic(cache_dir: str | None = None, **options) -> str:
    """Write the set (if not cached yet) and return its folder (Market-1501 layout)."""
    opt = synthetic_options(**options)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    spec = json.dumps({"generator": GENERATOR_VERSION, **opt}, sort_keys=True)
    final = os.path.join(cache_dir, "synthetic-" + hashlib.sha1(spec.encode()).hexdigest()[:12])
    if os.path.isdir(final):
        return final
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot make the synthetic set's folder {cache_dir} ({exc.strerror}); "
                           f"set --root or $IICS_FAST_CACHE to a folder you can write") from None
    from PIL import Image

    images, plan = render_synthetic(**opt)
    tmp = tempfile.mkdtemp(prefix=".synthetic-tmp-", dir=cache_dir)
    try:
        folders = dict(SPLIT_DIRS)
        for sub in folders.values():
            os.mkdir(os.path.join(tmp, sub))
        ext = opt["image_format"]
        save = {"quality": 92} if ext == "jpg" else {"compress_level": 1}
        for n, ((split, pid, cam), img) in enumerate(zip(plan, images)):
            name = f"{pid:04d}_c{cam + 1}s1_{n:06d}_00.{ext}"
            Image.fromarray(img).save(os.path.join(tmp, folders[split], name), **save)
        with open(os.path.join(tmp, "options.json"), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(json.loads(spec), indent=1) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # not a concurrent writer finishing first
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_synthetic(root: str | None = None, *, verify: bool = False, **options) -> ReidDataset:
    """The synthetic set: generated under ``root`` (the cache folder; default
    ``$IICS_FAST_CACHE`` or ``~/.cache/iics_fast``) unless already there, then read."""
    opt = synthetic_options(**options)
    folder = make_synthetic(root, **opt)
    ds = read_market_layout(folder, "synthetic", cameras=range(1, opt["num_cameras"] + 1),
                            verify=verify, camera_names=list(range(1, opt["num_cameras"] + 1)))
    ds.info = {"options": opt}
    return ds
