"""Augmentation: explicit views, image/label alignment, cat_max_ratio, eval resize, seeding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cascade_clip.config import AugmentConfig
from cascade_clip.data.transforms import (
    EvalTransform,
    Photometric,
    TrainTransform,
    View,
    _crop_ok,
    apply_photometric,
    apply_view,
    apply_view_to_label,
    denormalize,
    normalize,
    rescale_size,
    sample_rng,
    sample_view,
)

# Well separated colours; class k is drawn as PALETTE[k], ignore (255) as grey.
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180]], dtype=np.uint8)
GREY = np.array([128, 128, 128], dtype=np.uint8)


def colour_coded(h: int = 45, w: int = 70, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A blocky, left-right asymmetric label and the image painted from it."""
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), np.uint8)
    for k in range(1, len(PALETTE)):
        y, x = rng.integers(0, h - 12), rng.integers(0, w - 16)
        label[y : y + rng.integers(8, 20), x : x + rng.integers(10, 30)] = k
    label[: h // 5, w - w // 4 :] = 255
    image = np.where(label[..., None] == 255, GREY, PALETTE[np.minimum(label, len(PALETTE) - 1)])
    return image.astype(np.uint8), label


def decode_colours(image: np.ndarray) -> np.ndarray:
    """Nearest palette entry (255 for grey) of each pixel."""
    colours = np.concatenate([PALETTE, GREY[None]]).astype(np.int32)
    d = ((image[:, :, None, :].astype(np.int32) - colours[None, None]) ** 2).sum(-1)
    ids = d.argmin(-1)
    return np.where(ids == len(PALETTE), 255, ids).astype(np.int64)


def no_photo(**kw) -> AugmentConfig:
    return AugmentConfig(photometric=False, **kw)


def test_exact_alignment_without_resize():
    """Crop, flip and pad are exact: the label read back from the image's colours equals
    the label the pipeline returns, pixel for pixel."""
    image, label = colour_coded()
    cfg = no_photo(scale=(70, 45), ratio_range=(1.0, 1.0), crop_size=32)
    flips = set()
    for seed in range(12):
        view = sample_view(sample_rng(0, 0, seed), image.shape[:2], label, cfg)
        assert view.resized_hw == (45, 70)
        flips.add(view.flip)
        img, lab = apply_view(image, label, view)
        assert img.shape == (3, 32, 32) and lab.shape == (32, 32)
        assert torch.equal(torch.from_numpy(decode_colours(denormalize(img))), lab)
    assert flips == {True, False}


def test_alignment_survives_resize_crop_flip_pad():
    """With random resizes (bilinear image, nearest label) the colours still name the label
    almost everywhere (only resampled block edges may blend)."""
    image, label = colour_coded()
    cfg = no_photo(scale=(140, 90), ratio_range=(0.3, 1.5), crop_size=48)
    agree, total, padded = 0, 0, 0
    for seed in range(20):
        view = sample_view(sample_rng(1, 0, seed), image.shape[:2], label, cfg)
        img, lab = apply_view(image, label, view)
        y0, x0, y1, x1 = view.crop
        h, w = y1 - y0, x1 - x0
        assert torch.all(lab[h:, :] == 255) and torch.all(lab[:, w:] == 255)
        assert torch.all(img[:, h:, :] == 0) and torch.all(img[:, :, w:] == 0)
        padded += int(h < 48 or w < 48)
        decoded = decode_colours(denormalize(img[:, :h, :w]))
        agree += int((decoded == lab[:h, :w].numpy()).sum())
        total += h * w
    assert padded > 0
    assert agree / total > 0.97


def test_flip_mirrors_the_label():
    image, label = colour_coded()
    view = View((45, 70), (45, 70), (0, 0, 45, 70), (45, 70), flip=False)
    flipped = View((45, 70), (45, 70), (0, 0, 45, 70), (45, 70), flip=True)
    assert torch.equal(apply_view_to_label(label, flipped), apply_view_to_label(label, view).flip(1))
    a, _ = apply_view(image, None, view)
    b, _ = apply_view(image, None, flipped)
    assert torch.equal(a.flip(2), b)


def test_view_is_serialisable_and_replays_exactly():
    image, label = colour_coded()
    cfg = AugmentConfig(scale=(140, 90), ratio_range=(0.5, 2.0), crop_size=40)
    view = sample_view(np.random.default_rng(7), image.shape[:2], label, cfg)
    assert view == sample_view(np.random.default_rng(7), image.shape[:2], label, cfg)
    assert view.photometric is not None
    back = View.from_dict(json.loads(json.dumps(view.to_dict())))
    assert back == view
    img1, lab1 = apply_view(image, label, view)
    img2, lab2 = apply_view(image, label, back)
    assert torch.equal(img1, img2) and torch.equal(lab1, lab2)
    assert torch.equal(apply_view_to_label(label, back), lab1)
    with pytest.raises(ValueError, match="view expects"):
        apply_view_to_label(label[:10], view)


def test_rescale_rule_and_ratio():
    # long side <= 2048 r, short side <= 512 r, aspect kept (mmcv rounding)
    assert rescale_size((480, 640), (2048, 512)) == ((512, 683), pytest.approx(512 / 480))
    assert rescale_size((100, 1000), (2048, 512))[0] == (205, 2048)
    image, label = colour_coded(40, 60)
    cfg = no_photo(scale=(120, 80), ratio_range=(0.5, 2.0), crop_size=16)
    sizes = {sample_view(sample_rng(0, 0, i), (40, 60), label, cfg).resized_hw for i in range(30)}
    for h, w in sizes:
        assert abs(w / h - 1.5) < 0.1 and 20 <= h <= 160
    assert len(sizes) > 5


def test_cat_max_ratio_prefers_mixed_crops():
    label = np.zeros((100, 100), np.uint8)
    label[:, 80:] = 1  # a crop passes 0.75 only for x0 in 66..74 (9 of 81 offsets)
    base = dict(scale=(100, 100), ratio_range=(1.0, 1.0), crop_size=20, flip=False)

    def fraction_ok(ratio: float) -> float:
        cfg = no_photo(cat_max_ratio=ratio, **base)
        views = [sample_view(sample_rng(0, 0, i), (100, 100), label, cfg) for i in range(150)]
        return np.mean([_crop_ok(label, v.crop, 0.75) for v in views])

    assert fraction_ok(1.0) < 0.25  # a random crop rarely straddles the border well
    assert fraction_ok(0.75) > 0.55  # up to 10 re-draws usually find one


def test_crop_check_ignores_255():
    label = np.full((10, 10), 255, np.uint8)
    label[5:, :8] = 0
    label[5:, 8:] = 1  # of the labelled pixels, class 0 is 80%
    assert not _crop_ok(label, (0, 0, 10, 10), 0.75)
    assert _crop_ok(label, (0, 0, 10, 10), 0.85)
    assert not _crop_ok(np.full((4, 4), 255, np.uint8), (0, 0, 4, 4), 0.75)


def test_photometric_changes_image_not_label():
    image, label = colour_coded()
    p = Photometric(brightness=20.0, contrast=1.3, contrast_first=False, saturation=0.6, hue=30.0)
    out = apply_photometric(image, p)
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
    assert np.array_equal(apply_photometric(image, p), out)
    assert np.array_equal(apply_photometric(image, Photometric()), image)
    view = View((45, 70), (45, 70), (0, 0, 45, 70), (45, 70), photometric=p)
    plain = View((45, 70), (45, 70), (0, 0, 45, 70), (45, 70))
    assert torch.equal(apply_view(image, label, view)[1], apply_view(image, label, plain)[1])


def test_train_transform_shapes_and_view():
    image, label = colour_coded()
    t = TrainTransform(AugmentConfig(scale=(140, 90), crop_size=32), return_view=True)
    img, lab, extra = t(image, label, sample_rng(0, 0, 0))
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert lab.shape == (32, 32) and lab.dtype == torch.int64
    assert torch.equal(apply_view_to_label(label, extra["view"]), lab)


def test_eval_transform_keeps_aspect_and_label():
    image, label = colour_coded(40, 60)
    img, lab = EvalTransform(short_side=20)(image, label)
    assert img.shape == (3, 20, 30)
    assert torch.equal(lab, torch.from_numpy(label.astype(np.int64)))
    assert EvalTransform(20, max_long=24).size((40, 60)) == (16, 24)


def test_normalize_round_trip_and_seeding():
    image, _ = colour_coded()
    x = normalize(image)
    assert x.shape == (3, 45, 70) and abs(float(x.mean())) < 3
    assert np.array_equal(denormalize(x), image)
    a = sample_rng(1, 2, 3).random(4)
    assert np.array_equal(a, sample_rng(1, 2, 3).random(4))
    assert not np.array_equal(a, sample_rng(1, 3, 3).random(4))
    assert not np.array_equal(a, sample_rng(1, 2, 4).random(4))
