"""Input pipeline: shapes, normalisation, flip, pad + crop, random-erasing statistics."""
import numpy as np
import pytest
import torch
from PIL import Image

from iics_fast.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, ImageDataset, EvalTransform,
                                       TrainTransform, random_erasing)


def _image(rng, h=40, w=20):
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def test_test_transform_shape_and_normalisation(rng):
    img = Image.fromarray(np.full((50, 30, 3), 128, np.uint8))
    x = EvalTransform(32, 16)(img)
    assert x.shape == (3, 32, 16) and x.dtype == torch.float32
    expect = (128 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x.mean((1, 2)).numpy(), expect, rtol=1e-5)
    # bicubic resize of a non-constant image is the PIL one
    img = _image(rng, 50, 30)
    ref = np.asarray(img.resize((16, 32), Image.BICUBIC), np.float32) / 255
    ref = (ref - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(EvalTransform(32, 16)(img).permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_train_transform_shape_and_determinism(rng):
    img = _image(rng)
    t = TrainTransform(32, 16)
    a = t(img, np.random.default_rng(7))
    b = t(img, np.random.default_rng(7))
    assert a.shape == (3, 32, 16)
    assert torch.equal(a, b)
    outs = {t(img, np.random.default_rng(s)).sum().item() for s in range(10)}
    assert len(outs) > 5


def test_flip_only_mirrors(rng):
    img = _image(rng, 32, 16)
    plain = EvalTransform(32, 16)(img)
    t = TrainTransform(32, 16, pad=0, flip_p=1.0, erasing_p=0.0)
    assert torch.equal(t(img, np.random.default_rng(0)), plain.flip(2))
    t = TrainTransform(32, 16, pad=0, flip_p=0.0, erasing_p=0.0)
    assert torch.equal(t(img, np.random.default_rng(0)), plain)


def test_flip_probability_is_half(rng):
    img = _image(rng, 32, 16)
    plain = EvalTransform(32, 16)(img)
    t = TrainTransform(32, 16, pad=0, erasing_p=0.0)
    flips = sum(torch.equal(t(img, np.random.default_rng(s)), plain.flip(2)) for s in range(400))
    assert 160 < flips < 240


def test_pad_and_crop_is_a_shift(rng):
    img = _image(rng, 32, 16)
    plain = EvalTransform(32, 16)(img)
    t = TrainTransform(32, 16, pad=10, flip_p=0.0, erasing_p=0.0)
    zero = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1)
    for seed in range(20):
        x = t(img, np.random.default_rng(seed))
        # find the shift: the image content is the plain image moved by (dy, dx) in [-10, 10]
        found = False
        for dy in range(-10, 11):
            for dx in range(-10, 11):
                ys, xs = slice(max(0, dy), 32 + min(0, dy)), slice(max(0, dx), 16 + min(0, dx))
                ps, px = slice(max(0, -dy), 32 + min(0, -dy)), slice(max(0, -dx), 16 + min(0, -dx))
                if torch.allclose(x[:, ys, xs], plain[:, ps, px]):
                    border = torch.ones(32, 16, dtype=torch.bool)
                    border[ys, xs] = False
                    assert torch.allclose(x.permute(1, 2, 0)[border], zero.T.expand(int(border.sum()), 3))
                    found = True
                    break
            if found:
                break
        assert found


def test_random_erasing_statistics():
    h, w, n = 64, 32, 2000
    areas, aspects, erased = [], [], 0
    for s in range(n):
        x = torch.ones(3, h, w)
        random_erasing(x, np.random.default_rng(s), p=0.5, value=0.0)
        mask = (x[0] == 0)
        if mask.any():
            erased += 1
            rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
            eh, ew = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert mask.sum() == eh * ew  # one rectangle
            assert (x[:, mask] == 0).all()  # all channels
            areas.append(eh * ew / (h * w))
            aspects.append(eh / ew)
    assert abs(erased / n - 0.5) < 0.05
    areas = np.array(areas)
    assert areas.min() >= 0.015 and areas.max() <= 0.42  # 0.02-0.4 up to rounding
    assert areas.min() < 0.03 and areas.max() > 0.38  # ... and the whole range is drawn
    assert np.mean(areas) == pytest.approx(0.21, abs=0.03)  # about uniform on [0.02, 0.4]
    assert min(aspects) >= 0.25 and max(aspects) <= 1 / 0.25  # 0.3-3.3 up to rounding
    assert min(aspects) < 0.4 and max(aspects) > 2.5


def test_dataset_items_and_seeded_access(tmp_path, rng):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        _image(rng).save(p)
        paths.append(str(p))
    ds = ImageDataset([(p, i, 2 * i) for i, p in enumerate(paths)], TrainTransform(32, 16))
    x, label, cam, idx = ds[(1, 99)]
    assert x.shape == (3, 32, 16) and (label, cam, idx) == (1, 2, 1)
    assert torch.equal(ds[(1, 99)][0], x)
    assert len(ds) == 3


def test_unreadable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    ds = ImageDataset([(str(bad), 0, 0)], EvalTransform(32, 16))
    with pytest.raises(ValueError, match="cannot read image"):
        ds[0]


def test_random_erasing_fills_the_reference_values():
    """The reference's RandomErasing writes (0.4914, 0.4822, 0.4465) into the normalised
    tensor; with p = 1 every image gets one rectangle of exactly those values."""
    fill = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    erase = TrainTransform(32, 16, pad=0, flip_p=0.0, erasing_p=1.0)
    keep = TrainTransform(32, 16, pad=0, flip_p=0.0, erasing_p=0.0)
    for s in range(20):
        img = _image(np.random.default_rng(100 + s), 32, 16)
        x, plain = erase(img, np.random.default_rng(s)), keep(img, np.random.default_rng(s))
        changed = (x != plain).any(0)
        assert changed.any()
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        box = x[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert (box == fill).all()  # one rectangle, every channel at the reference's value
