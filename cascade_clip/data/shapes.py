"""The embedded "shapes" world (docs/design.md: The shapes world): a procedurally generated segmentation
dataset, deterministic from a seed, written in the common on-disk format.

Every image has a textured "stuff" background (one or two regions, split by a wavy line)
and one to three coloured "things" (balls, boxes, rings) that do not overlap. Class names share words
on purpose, so a language model can compose names it never saw paired with a mask:

- things:  colour x kind,     e.g. "red ball", "blue box", "yellow ring";
- stuff:   colour x pattern,  e.g. "green stripes", "purple dots".

The default unseen split holds out some things and some stuff such that every colour,
kind and pattern word still occurs in seen classes. Each image also gets an image-level
caption naming every class present (unseen ones included), for pre-training the world's
small CLIP on images and captions alone.

Layout written by `generate_shapes` (shared contract with the loader)::

    <root>/dataset.json            {"name", "classes", "unseen", "image_suffix", "label_suffix"}
    <root>/images/<split>/<id>.png RGB
    <root>/labels/<split>/<id>.png mode "L", train ids 0..K-1 (255 = ignore, unused here)
    <root>/splits/<split>.txt      one id per line
    <root>/captions/<split>.jsonl  {"id", "caption", "classes"}
    <root>/generator.json          the generator's arguments (for the record)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cascade_clip.data.manifest import write_manifests
from cascade_clip.errors import InputError, MissingInputError

# --- the class vocabulary -------------------------------------------------------------

THING_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "blue": (40, 84, 222),
    "yellow": (238, 198, 34),
}
THING_KINDS: tuple[str, ...] = ("ball", "box", "ring")
STUFF_COLOURS: dict[str, tuple[int, int, int]] = {
    "green": (52, 150, 70),
    "purple": (132, 64, 164),
    "brown": (138, 92, 50),
}
STUFF_PATTERNS: tuple[str, ...] = ("stripes", "dots", "checks")

THINGS: tuple[str, ...] = tuple(f"{c} {s}" for c in THING_COLOURS for s in THING_KINDS)
STUFF: tuple[str, ...] = tuple(f"{c} {p}" for c in STUFF_COLOURS for p in STUFF_PATTERNS)
CLASSES: tuple[str, ...] = THINGS + STUFF
"""All class names in train-id order: 9 things, then 9 stuff."""

UNSEEN: tuple[str, ...] = ("red ring", "blue box", "green dots", "purple checks")
"""Default held-out classes: two things and two stuff; every word stays in seen classes."""

SHAPES_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "there is a {} in the scene.",
    "a picture of a {}.",
    "a {}.",
)
"""Prompt templates for class text embeddings (template set "shapes")."""

SPLITS: tuple[str, ...] = ("train", "val", "pretrain", "test")
"""The world's image sets, each its own random stream: `train` (the decoders' masks),
`val` (every tuning choice), `pretrain` (the small CLIP's images and captions: the
segmentation stages never see them, as real CLIP never saw COCO's images), `test` (the
reported numbers). A split asked for with 0 images is not written."""


def class_names() -> list[str]:
    """The class names in train-id order."""
    return list(CLASSES)


def default_unseen() -> list[str]:
    """The default unseen class names."""
    return list(UNSEEN)


def is_thing(name: str) -> bool:
    return name in THINGS


# --- rendering --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One generated image: image (H, W, 3) uint8, label (H, W) uint8, caption, classes."""

    image: np.ndarray
    label: np.ndarray
    caption: str
    classes: list[str]


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _pattern_mask(pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool: where the pattern's second tone goes. Scale tied to size/128."""
    s = size / 128.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if pattern == "stripes":
        period = rng.uniform(8.0, 11.0) * s
        return ((u + rng.uniform(0, period)) % period) < period * 0.5
    if pattern == "dots":
        spacing = rng.uniform(7.0, 9.0) * s
        radius = rng.uniform(0.28, 0.34) * spacing
        du = (u + rng.uniform(0, spacing)) % spacing - spacing / 2
        dv = (v + rng.uniform(0, spacing)) % spacing - spacing / 2
        return du * du + dv * dv < radius * radius
    if pattern == "checks":
        cell = rng.uniform(4.5, 6.0) * s
        iu = np.floor((u + rng.uniform(0, cell)) / cell)
        iv = np.floor((v + rng.uniform(0, cell)) / cell)
        return ((iu + iv) % 2) == 1
    raise InputError(f"unknown pattern {pattern!r}")


def _stuff_texture(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 texture of a stuff class: base colour + a lighter pattern."""
    colour, pattern = name.split(" ")
    base = _jitter(STUFF_COLOURS[colour], rng, 14)
    light = base + (255.0 - base) * rng.uniform(0.35, 0.5)
    mask = _pattern_mask(pattern, size, rng)
    return np.where(mask[..., None], light, base).astype(np.float32)


def _stuff_layout(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool: the second stuff region, bounded by a wavy line; each side >= 20%."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(100):
        angle = rng.uniform(0, 2 * math.pi)
        offset = rng.uniform(-0.3, 0.3) * size
        amp = rng.uniform(0, 0.06) * size
        freq = rng.uniform(1.0, 3.0) * 2 * math.pi / size
        phase = rng.uniform(0, 2 * math.pi)
        c = size / 2
        u = (xx - c) * math.cos(angle) + (yy - c) * math.sin(angle)
        v = -(xx - c) * math.sin(angle) + (yy - c) * math.cos(angle)
        region = u + amp * np.sin(freq * v + phase) > offset
        if 0.2 <= region.mean() <= 0.8:
            return region
    return xx >= size / 2  # pragma: no cover - practically unreachable


def _thing_layer(
    kind: str, colour: np.ndarray, cx: float, cy: float, r: float, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One thing: (mask (size, size) bool, rgb (size, size, 3) float32 valid under the mask).

    Each kind has its own outline *and* its own surface, so a small image patch already
    tells the kinds apart (as texture tells real object classes apart):
    ball = disc shaded from a bright centre to a dark rim; box = rotated square with a
    dark grid inside; ring = flat annulus.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    d = np.sqrt(dx * dx + dy * dy)
    if kind == "ball":
        mask = d <= r
        shade = 1.3 - 0.75 * (d / r) ** 1.5
        rgb = np.clip(colour[None, None] * shade[..., None], 0, 255)
    elif kind == "box":
        angle = rng.uniform(0, math.pi / 2)
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        half = r * 0.9
        mask = (np.abs(u) <= half) & (np.abs(v) <= half)
        period = max(3.0, rng.uniform(4.5, 5.5) * size / 128.0)
        lines = ((u + half) % period < 1.5) | ((v + half) % period < 1.5)
        rgb = np.where(lines[..., None], colour[None, None] * 0.45, colour[None, None])
    elif kind == "ring":
        width = r * rng.uniform(0.52, 0.62)
        mask = (d <= r) & (d >= r - width)
        rgb = np.broadcast_to(colour[None, None], (size, size, 3))
    else:
        raise InputError(f"unknown thing kind {kind!r}")
    return mask, rgb.astype(np.float32)


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def make_caption(things: Sequence[str], stuff: Sequence[str]) -> str:
    """ "a photo of a red ball and a blue ring on green stripes and purple dots."."""
    parts = []
    if things:
        parts.append(_join([f"a {t}" for t in things]))
    if stuff:
        parts.append(("on " if things else "") + _join(list(stuff)))
    return "a photo of " + " ".join(parts) + "."


def render_sample(rng: np.random.Generator, image_size: int = 128, max_things: int = 3) -> Sample:
    """Draw one image, its label map and its caption from `rng`."""
    size = image_size
    ids = {name: i for i, name in enumerate(CLASSES)}
    # Stuff: one region (30%) or two.
    n_stuff = 1 if rng.random() < 0.3 else 2
    stuff = [STUFF[i] for i in rng.choice(len(STUFF), size=n_stuff, replace=False)]
    image = _stuff_texture(stuff[0], size, rng)
    label = np.full((size, size), ids[stuff[0]], np.uint8)
    if n_stuff == 2:
        region = _stuff_layout(size, rng)
        image = np.where(region[..., None], _stuff_texture(stuff[1], size, rng), image)
        label[region] = ids[stuff[1]]
    # Things: 1..max_things, placed without overlap (rejection sampling).
    n_things = int(rng.integers(1, max_things + 1))
    placed: list[tuple[float, float, float]] = []
    for _ in range(n_things):
        name = THINGS[int(rng.integers(len(THINGS)))]
        for _attempt in range(50):
            r = rng.uniform(0.10, 0.18) * size
            cx, cy = rng.uniform(r, size - r, 2)
            if all(math.hypot(cx - x, cy - y) > 1.5 * (r + rr) for x, y, rr in placed):
                placed.append((cx, cy, r))
                colour, kind = name.split(" ")
                mask, rgb = _thing_layer(kind, _jitter(THING_COLOURS[colour], rng, 16), cx, cy, r, size, rng)
                image = np.where(mask[..., None], rgb, image)
                label[mask] = ids[name]
                break
    image = image + rng.normal(0.0, 5.0, (size, size, 3))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    present = [CLASSES[i] for i in np.unique(label) if i != 255]
    things_present = [c for c in present if c in THINGS]
    stuff_present = [c for c in present if c in STUFF]
    rng.shuffle(things_present)
    rng.shuffle(stuff_present)
    caption = make_caption(things_present, stuff_present)
    return Sample(image=image, label=label, caption=caption, classes=sorted(present, key=ids.get))


def _write_png(array: np.ndarray, path: Path, mode: str) -> None:
    Image.fromarray(array, mode).save(path, format="PNG", optimize=False, compress_level=6)


def _write_sample(job: tuple[Path, str, int, int, int, int, int]) -> tuple[str, str]:
    """Render image `i` of a split from its own stream and write it; returns (id, caption JSON)."""
    root, split, split_index, i, seed, image_size, max_things = job
    rng = np.random.default_rng([seed, split_index, i])
    sample = render_sample(rng, image_size=image_size, max_things=max_things)
    sid = f"{split}_{i:06d}"
    _write_png(sample.image, root / "images" / split / f"{sid}.png", "RGB")
    _write_png(sample.label, root / "labels" / split / f"{sid}.png", "L")
    return sid, json.dumps({"id": sid, "caption": sample.caption, "classes": sample.classes})


def generate_shapes(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 400,
    num_pretrain: int = 0,
    num_test: int = 0,
    image_size: int = 128,
    max_things: int = 3,
    unseen: Sequence[str] | None = None,
    progress: bool = True,
    workers: int = 1,
) -> Path:
    """Write the shapes world under `out_dir` and return it.

    Deterministic: the same arguments give byte-identical files. Image i of split s (its
    index in SPLITS) is drawn from `np.random.default_rng([seed, s, i])`, so splits and
    images are independent streams, and adding a split changes no other split's images.
    `unseen` (default `UNSEEN`) is recorded in dataset.json; it does not change the images.
    `workers` > 1 renders in that many processes (same files).
    """
    if image_size < 32:
        raise InputError(f"image_size must be >= 32, got {image_size}")
    if max_things < 1:
        raise InputError(f"max_things must be >= 1, got {max_things}")
    unseen = list(UNSEEN if unseen is None else unseen)
    unknown = [u for u in unseen if u not in CLASSES]
    if unknown:
        raise InputError(f"unknown unseen class name(s) {unknown}; known: {list(CLASSES)}")
    root = Path(out_dir)
    counts = {"train": num_train, "val": num_val, "pretrain": num_pretrain, "test": num_test}
    written = [split for split in SPLITS if split in ("train", "val") or counts[split] > 0]
    for split in written:
        for sub in ("images", "labels"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "captions").mkdir(parents=True, exist_ok=True)
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for split in written:
            s = SPLITS.index(split)
            jobs = [(root, split, s, i, seed, image_size, max_things) for i in range(counts[split])]
            # Every image is its own stream, so worker processes write exactly what one would.
            done = pool.map(_write_sample, jobs, chunksize=32) if pool else map(_write_sample, jobs)
            records = list(tqdm(done, total=len(jobs), desc=f"shapes {split}", disable=not progress))
            ids = [sid for sid, _ in records]
            lines = [line for _, line in records]
            (root / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in ids))
            (root / "captions" / f"{split}.jsonl").write_text("".join(f"{line}\n" for line in lines))
    finally:
        if pool is not None:
            pool.shutdown()
    generator = {
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "num_pretrain": num_pretrain,
        "num_test": num_test,
        "image_size": image_size,
        "max_things": max_things,
    }
    (root / "generator.json").write_text(json.dumps(generator, indent=2) + "\n")
    meta = {
        "name": "shapes",
        "classes": list(CLASSES),
        "unseen": unseen,
        "image_suffix": ".png",
        "label_suffix": ".png",
    }
    # dataset.json last: its presence marks a complete world (the workflow's output).
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_manifests(root, progress=False)
    return root


def read_captions(root: str | Path, split: str) -> list[dict]:
    """The caption records of one split, in split-file order: [{"id", "caption", "classes"}]."""
    path = Path(root) / "captions" / f"{split}.jsonl"
    if not path.is_file():
        raise MissingInputError(f"{path}: caption file not found")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for n, rec in enumerate(records):
        if not {"id", "caption", "classes"} <= set(rec):
            raise InputError(f"{path}:{n + 1}: caption record lacks id, caption or classes")
    return records
