"""Training augmentation as explicit, replayable views, and the validation resize.

Training (docs/design.md: The model; MMSeg's pipeline): resize with a random ratio (long side <=
scale[0]*r, short side <= scale[1]*r, aspect kept), random crop with cat_max_ratio,
horizontal flip, photometric distortion, ImageNet normalisation, pad to the crop size
(image 0 after normalisation, label 255).

All randomness is drawn once by `sample_view(rng, image_hw, label, cfg)` into a `View`, a
small frozen dataclass (plain ints/floats/bools, `to_dict`/`from_dict` for JSON or HDF5
attributes). `apply_view(image, label, view)` is deterministic, so a feature cache can
store the view and later rebuild the exact label crop with `apply_view_to_label`.

Arrays: images are (H, W, 3) uint8 RGB, labels (H, W) uint8; outputs are a float32 tensor
(3, h, w) and an int64 tensor (h, w).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from cascade_clip.config import AugmentConfig
from cascade_clip.data import IGNORE_INDEX
from cascade_clip.errors import InputError

# ImageNet mean/std in 0..255 units (RGB), as MMSeg's Normalize.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)

# MMSeg PhotoMetricDistortion defaults.
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA_DEGREES = 36.0  # MMSeg's hue_delta=18 in OpenCV's half-degree units
CAT_MAX_RETRIES = 10


@dataclass(frozen=True)
class Photometric:
    """Photometric distortion parameters; None = that step is skipped."""

    brightness: float | None = None  # added to every channel (0..255 units)
    contrast: float | None = None  # multiplies every channel
    contrast_first: bool = True  # contrast before (True) or after saturation/hue
    saturation: float | None = None  # multiplies HSV saturation
    hue: float | None = None  # degrees added to HSV hue


@dataclass(frozen=True)
class View:
    """One augmented view of an image, fully explicit.

    image_hw: source (H, W); resized_hw: size after the random resize (scale = resize
    factor, informative: resized_hw is what apply_view uses); crop: (y0, x0, y1, x1) in
    resized coordinates; out_hw: output size after padding (>= crop size); flip: horizontal
    flip after cropping; photometric: None when off.
    """

    image_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    crop: tuple[int, int, int, int]
    out_hw: tuple[int, int]
    flip: bool = False
    scale: float = 1.0
    photometric: Photometric | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (lists for tuples)."""
        d = asdict(self)
        for key in ("image_hw", "resized_hw", "crop", "out_hw"):
            d[key] = [int(v) for v in d[key]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> View:
        photo = d.get("photometric")
        return cls(
            image_hw=tuple(int(v) for v in d["image_hw"]),
            resized_hw=tuple(int(v) for v in d["resized_hw"]),
            crop=tuple(int(v) for v in d["crop"]),
            out_hw=tuple(int(v) for v in d["out_hw"]),
            flip=bool(d.get("flip", False)),
            scale=float(d.get("scale", 1.0)),
            photometric=Photometric(**photo) if photo else None,
        )

    @classmethod
    def identity(cls, image_hw: tuple[int, int]) -> View:
        h, w = image_hw
        return cls((h, w), (h, w), (0, 0, h, w), (h, w))


# --- sampling -------------------------------------------------------------------------------


def rescale_size(hw: tuple[int, int], scale: tuple[float, float]) -> tuple[tuple[int, int], float]:
    """Keep-ratio size so that long side <= max(scale), short side <= min(scale) (mmcv)."""
    h, w = hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return (max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))), factor


def _random_crop(rng: np.random.Generator, hw: tuple[int, int], crop: int) -> tuple[int, int, int, int]:
    h, w = hw
    y0 = int(rng.integers(0, max(h - crop, 0) + 1))
    x0 = int(rng.integers(0, max(w - crop, 0) + 1))
    return y0, x0, y0 + min(crop, h), x0 + min(crop, w)


def _crop_ok(label: np.ndarray, box: tuple[int, int, int, int], cat_max_ratio: float) -> bool:
    y0, x0, y1, x1 = box
    counts = np.bincount(label[y0:y1, x0:x1].ravel(), minlength=256)
    counts[IGNORE_INDEX] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def sample_photometric(rng: np.random.Generator) -> Photometric:
    """MMSeg's PhotoMetricDistortion draws: each step on with probability 1/2."""
    brightness = float(rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)) if rng.random() < 0.5 else None
    contrast_first = bool(rng.random() < 0.5)
    contrast = float(rng.uniform(*CONTRAST_RANGE)) if rng.random() < 0.5 else None
    saturation = float(rng.uniform(*SATURATION_RANGE)) if rng.random() < 0.5 else None
    hue = float(rng.uniform(-HUE_DELTA_DEGREES, HUE_DELTA_DEGREES)) if rng.random() < 0.5 else None
    return Photometric(brightness, contrast, contrast_first, saturation, hue)


def sample_view(
    rng: np.random.Generator,
    image_hw: tuple[int, int],
    label: np.ndarray | None,
    cfg: AugmentConfig,
) -> View:
    """Draw one training view: ratio resize, crop (cat_max_ratio), flip, photometric.

    `label` (H, W) uint8, already in the form training sees (unseen mapped), is used only
    for the cat_max_ratio test: up to 10 re-draws, as MMSeg's RandomCrop, until no single
    class (255 not counted) covers cat_max_ratio of the crop and at least two classes are
    present; the last draw is kept otherwise. None skips the test.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    r = float(rng.uniform(*cfg.ratio_range))
    resized_hw, factor = rescale_size((h, w), (cfg.scale[0] * r, cfg.scale[1] * r))
    crop = int(cfg.crop_size)
    box = _random_crop(rng, resized_hw, crop)
    if label is not None and cfg.cat_max_ratio < 1.0:
        if label.shape[:2] != (h, w):
            raise InputError(f"label is {label.shape[:2]}, image is {(h, w)}")
        resized_label = resize_label(label, resized_hw)
        for _ in range(CAT_MAX_RETRIES):
            if _crop_ok(resized_label, box, cfg.cat_max_ratio):
                break
            box = _random_crop(rng, resized_hw, crop)
    flip = bool(cfg.flip and rng.random() < 0.5)
    photometric = sample_photometric(rng) if cfg.photometric else None
    out_hw = (max(crop, box[2] - box[0]), max(crop, box[3] - box[1]))
    return View((h, w), resized_hw, box, out_hw, flip, factor, photometric)


# --- applying -------------------------------------------------------------------------------


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W, 3) uint8 image to (h, w)."""
    if image.shape[:2] == tuple(hw):
        return image
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))


def resize_label(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) uint8 label to (h, w)."""
    if label.shape[:2] == tuple(hw):
        return label
    im = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))  # 2-D uint8: mode L
    return np.asarray(im.resize((hw[1], hw[0]), Image.NEAREST))


def apply_photometric(image: np.ndarray, p: Photometric) -> np.ndarray:
    """Photometric distortion of an (H, W, 3) uint8 RGB image; each step re-quantises to uint8."""

    def affine(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    img = image
    if p.brightness is not None:
        img = affine(img, beta=p.brightness)
    if p.contrast_first and p.contrast is not None:
        img = affine(img, alpha=p.contrast)
    if p.saturation is not None or p.hue is not None:
        hsv = np.array(Image.fromarray(img).convert("HSV"))
        if p.saturation is not None:
            hsv[..., 1] = affine(hsv[..., 1], alpha=p.saturation)
        if p.hue is not None:
            shift = int(round(p.hue * 256.0 / 360.0))
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 256).astype(np.uint8)
        hsv_image = Image.frombytes("HSV", (hsv.shape[1], hsv.shape[0]), hsv.tobytes())
        img = np.asarray(hsv_image.convert("RGB"))
    if not p.contrast_first and p.contrast is not None:
        img = affine(img, alpha=p.contrast)
    return img


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 with ImageNet mean/std."""
    x = (np.asarray(image, dtype=np.float32) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Inverse of `normalize`: (3, H, W) float -> (H, W, 3) uint8 (rounded, clipped)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (image.detach().cpu().float() * std + mean).round().clamp(0, 255)
    return x.permute(1, 2, 0).to(torch.uint8).numpy()


def _check_view(view: View) -> None:
    y0, x0, y1, x1 = view.crop
    rh, rw = view.resized_hw
    if not (0 <= y0 < y1 <= rh and 0 <= x0 < x1 <= rw):
        raise InputError(f"view crop {view.crop} lies outside the resized image {view.resized_hw}")
    if view.out_hw[0] < y1 - y0 or view.out_hw[1] < x1 - x0:
        raise InputError(f"view out_hw {view.out_hw} is smaller than its crop {view.crop}")


def apply_view_to_label(label: np.ndarray, view: View) -> torch.Tensor:
    """The view's label: nearest resize, crop, flip, pad with 255 -> (h, w) int64 tensor."""
    if tuple(label.shape[:2]) != tuple(view.image_hw):
        raise InputError(f"label is {tuple(label.shape[:2])}, view expects {tuple(view.image_hw)}")
    _check_view(view)
    y0, x0, y1, x1 = view.crop
    lab = resize_label(np.asarray(label, dtype=np.uint8), view.resized_hw)[y0:y1, x0:x1]
    if view.flip:
        lab = lab[:, ::-1]
    out = np.full(view.out_hw, IGNORE_INDEX, dtype=np.int64)
    out[: lab.shape[0], : lab.shape[1]] = lab
    return torch.from_numpy(out)


def apply_view_to_image(image: np.ndarray, view: View) -> torch.Tensor:
    """The view's image: bilinear resize, crop, flip, photometric, normalise, pad with 0."""
    if tuple(image.shape[:2]) != tuple(view.image_hw):
        raise InputError(f"image is {tuple(image.shape[:2])}, view expects {tuple(view.image_hw)}")
    _check_view(view)
    y0, x0, y1, x1 = view.crop
    img = resize_image(image, view.resized_hw)[y0:y1, x0:x1]
    if view.flip:
        img = img[:, ::-1]
    if view.photometric is not None:
        img = apply_photometric(np.ascontiguousarray(img), view.photometric)
    x = normalize(img)
    if tuple(x.shape[1:]) != tuple(view.out_hw):
        padded = torch.zeros((3, *view.out_hw), dtype=x.dtype)
        padded[:, : x.shape[1], : x.shape[2]] = x
        x = padded
    return x


def apply_view(
    image: np.ndarray, label: np.ndarray | None, view: View
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deterministically render `view` of (image, label): ((3, h, w) float32, (h, w) int64)."""
    return apply_view_to_image(image, view), (
        None if label is None else apply_view_to_label(label, view)
    )


# --- transform objects used by the loader ------------------------------------------------


class TrainTransform:
    """`(image, label, rng) -> (image, label)`: sample_view then apply_view.

    With `return_view=True` a third element {"view": View} is returned as well.
    """

    def __init__(self, cfg: AugmentConfig | None = None, return_view: bool = False) -> None:
        self.cfg = cfg or AugmentConfig()
        self.return_view = return_view

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        view = sample_view(rng, image.shape[:2], label, self.cfg)
        img, lab = apply_view(image, label, view)
        return (img, lab, {"view": view}) if self.return_view else (img, lab)


class EvalTransform:
    """Validation: resize keeping aspect ratio so the short side is `short_side` (and the
    long side at most `max_long`, if given), normalise; the label stays at full size."""

    def __init__(self, short_side: int = 512, max_long: int | None = None) -> None:
        self.short_side = int(short_side)
        self.max_long = max_long

    def size(self, hw: tuple[int, int]) -> tuple[int, int]:
        h, w = hw
        factor = self.short_side / min(h, w)
        if self.max_long is not None:
            factor = min(factor, self.max_long / max(h, w))
        return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: Any = None):
        img = normalize(resize_image(image, self.size(image.shape[:2])))
        lab = None if label is None else torch.from_numpy(label.astype(np.int64))
        return img, lab


def eval_transform(short_side: int = 512, max_long: int | None = None) -> EvalTransform:
    """The validation transform (see EvalTransform)."""
    return EvalTransform(short_side, max_long)


def train_transform(cfg: AugmentConfig | None = None) -> TrainTransform:
    """The training transform for an AugmentConfig (see TrainTransform)."""
    return TrainTransform(cfg)


# --- deterministic seeding ----------------------------------------------------------------


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of one sample: a pure function of (seed, epoch, index),
    so views do not depend on the number of workers or on which worker loads the sample."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed Python's and NumPy's global RNGs from the worker's
    torch seed (itself derived from the loader's generator), so stray global randomness is
    reproducible too. Augmentation itself uses `sample_rng` and needs no worker state."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """A seeded torch.Generator for DataLoader(shuffle=True, generator=...)."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g
