"""Converters from the real datasets' release formats to the common on-disk format.

Output (see cascade_clip.data): `dataset.json`, `images/<split>/<id>.jpg` (hard links to the
source JPEGs where the file system allows, else copies), `labels/<split>/<id>.png` (uint8,
mode "L", train ids, 255 = ignore) and `splits/<split>.txt`. Each converter also writes
`splits/<split>.classes.json` ({id: [train ids present]}), which the loader uses to drop
images with unseen classes without decoding every label. `dataset.json` is written last,
so its presence marks a finished conversion.

Sources (layouts as `cascade-clip download` leaves them):

- COCO-Stuff 164k: `images/{train2017,val2017}/*.jpg` and
  `stuffthingmaps/{train2017,val2017}/*.png` (ids 0..181, 255 unlabeled) -> 171 ids.
- VOC 2012 aug: `VOCdevkit/VOC2012` (JPEGImages, SegmentationClass, ImageSets/Segmentation)
  and `benchmark_RELEASE/dataset` (SBD: cls/*.mat, img/, train.txt, val.txt).
- PASCAL Context 59: `VOCdevkit/VOC2010/JPEGImages` and `trainval_merged.json` (Detail API).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cascade_clip.data import IGNORE_INDEX
from cascade_clip.data.registry import (
    COCO_STUFF_171,
    COCO_STUFF_UNUSED_IDS,
    CONTEXT_59_DETAIL_IDS,
    VOC_CLASSES,
)
from cascade_clip.errors import InputError, MissingInputError

# --- common output helpers ----------------------------------------------------------------


def read_label_png(path: Path) -> np.ndarray:
    """A single-channel label PNG as a (H, W) uint8 array of raw indices (mode L or P)."""
    if not path.is_file():
        raise MissingInputError(f"{path}: label not found")
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise InputError(f"{path}: label has mode {im.mode!r}; expected single-channel L or P")
            return np.array(im, dtype=np.uint8)
    except (OSError, SyntaxError) as err:
        raise InputError(f"{path}: unreadable label ({err})") from None


def write_label_png(path: Path, label: np.ndarray) -> None:
    """Save a (H, W) uint8 array as a mode "L" PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(path)  # 2-D uint8: mode L


def place_image(src: Path, dst: Path, link: bool = True) -> None:
    """Hard-link (or copy) a source image into the output tree, replacing what is there."""
    if not src.is_file():
        raise MissingInputError(f"{src}: image not found")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def image_size(path: Path, needed_by: Path | str | None = None) -> tuple[int, int]:
    """(H, W) from the image header. A missing image is a MissingInputError naming it and,
    when given, the label or annotation file that needs it."""
    if not Path(path).is_file():
        of = f" (the image of {needed_by})" if needed_by else ""
        raise MissingInputError(f"{path}: image not found{of}")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, SyntaxError) as err:
        raise InputError(f"{path}: unreadable image ({err})") from None
    return h, w


def check_same_size(image: Path, label_path: Path, label: np.ndarray) -> None:
    hw = image_size(image, label_path)
    if tuple(label.shape[:2]) != hw:
        raise InputError(
            f"{label_path}: label size {label.shape[1]}x{label.shape[0]} differs from image "
            f"{image} size {hw[1]}x{hw[0]}"
        )


def write_split(out: Path, split: str, ids: Sequence[str], presence: dict[str, list[int]]) -> None:
    (out / "splits").mkdir(parents=True, exist_ok=True)
    (out / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / "splits" / f"{split}.classes.json").write_text(
        json.dumps({i: presence[i] for i in ids}, separators=(",", ":"))
    )


def write_dataset_json(out: Path, name: str, classes: Sequence[str], image_suffix: str = ".jpg") -> None:
    meta = {"name": name, "classes": list(classes), "image_suffix": image_suffix,
            "label_suffix": ".png"}
    tmp = out / "dataset.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / "dataset.json")


def _start(out: Path, force: bool) -> bool:
    """False when `out` already holds a finished conversion (and not forced)."""
    if (out / "dataset.json").is_file() and not force:
        return False
    out.mkdir(parents=True, exist_ok=True)
    if (out / "dataset.json").exists():
        (out / "dataset.json").unlink()
    return True


def _present(label: np.ndarray) -> list[int]:
    return [int(v) for v in np.unique(label) if v != IGNORE_INDEX]


def _map_all(fn: Callable, tasks: list, workers: int, desc: str) -> list:
    """fn over tasks (in order), in `workers` processes when > 1, with a progress bar."""
    if workers <= 1:
        return [fn(t) for t in tqdm(tasks, desc=desc, unit="img")]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(fn, tasks, chunksize=16), total=len(tasks), desc=desc, unit="img"))


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingInputError(f"{path}: split list not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# --- COCO-Stuff 164k ----------------------------------------------------------------------


def coco_stuff_lut() -> np.ndarray:
    """(256,) uint8: stuffthingmap id (0..181, 255) -> contiguous train id (0..170, 255)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    kept = [i for i in range(182) if i not in COCO_STUFF_UNUSED_IDS]
    assert len(kept) == len(COCO_STUFF_171)
    lut[kept] = np.arange(len(kept), dtype=np.uint8)
    return lut


_COCO_LUT = coco_stuff_lut()


def convert_coco_stuff_label(label: np.ndarray, path: Path | str = "label") -> np.ndarray:
    """Map a stuffthingmap (ids 0..181, 255 unlabeled) to 171 train ids (255 ignore).

    The 11 unused thing ids cannot occur in real maps; if they do they become 255.
    """
    values = np.unique(label)
    bad = [int(v) for v in values if 181 < v < 255]
    if bad:
        raise InputError(f"{path}: values {bad} are not COCO-Stuff ids 0..181 or 255")
    return _COCO_LUT[label]


def _coco_one(task: tuple[Path, Path, Path, Path, bool]) -> list[int]:
    img_src, map_src, img_dst, lbl_dst, link = task
    label = convert_coco_stuff_label(read_label_png(map_src), map_src)
    check_same_size(img_src, map_src, label)
    write_label_png(lbl_dst, label)
    place_image(img_src, img_dst, link)
    return _present(label)


def convert_coco_stuff(
    src: str | Path,
    out: str | Path,
    *,
    splits: dict[str, str] | None = None,
    workers: int = 1,
    link: bool = True,
    force: bool = False,
) -> dict[str, int]:
    """COCO-Stuff 164k -> common format; returns {split: number of images}.

    `splits` maps output split -> source folder name (default train: train2017,
    val: val2017). Ids are the stuffthingmap file stems (e.g. 000000000139).
    """
    src, out = Path(src), Path(out)
    splits = splits or {"train": "train2017", "val": "val2017"}
    if not _start(out, force):
        return _counts(out, splits)
    counts = {}
    for split, folder in splits.items():
        maps_dir = src / "stuffthingmaps" / folder
        if not maps_dir.is_dir():
            raise MissingInputError(f"{maps_dir}: stuffthingmaps folder not found")
        ids = sorted(p.stem for p in maps_dir.glob("*.png"))
        if not ids:
            raise InputError(f"{maps_dir}: no label PNGs found")
        tasks = [
            (src / "images" / folder / f"{i}.jpg", maps_dir / f"{i}.png",
             out / "images" / split / f"{i}.jpg", out / "labels" / split / f"{i}.png", link)
            for i in ids
        ]
        presence = _map_all(_coco_one, tasks, workers, f"coco_stuff {split}")
        write_split(out, split, ids, dict(zip(ids, presence)))
        counts[split] = len(ids)
    write_dataset_json(out, "coco_stuff_164k", COCO_STUFF_171)
    return counts


def _counts(out: Path, splits: Iterable[str]) -> dict[str, int]:
    return {s: len(_read_ids(out / "splits" / f"{s}.txt")) for s in splits}


# --- PASCAL VOC 2012 + SBD aug ------------------------------------------------------------


def convert_voc_label(label: np.ndarray, path: Path | str = "label") -> np.ndarray:
    """VOC/SBD class indices -> 20 train ids: 0 background -> 255, c -> c-1, 255 stays."""
    values = np.unique(label)
    bad = [int(v) for v in values if 20 < v < 255]
    if bad:
        raise InputError(f"{path}: values {bad} are not VOC class indices 0..20 or 255")
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[1:21] = np.arange(20, dtype=np.uint8)
    return lut[label]


def read_sbd_mat(path: Path) -> np.ndarray:
    """SBD `cls/<id>.mat` -> (H, W) uint8 class indices from `GTcls.Segmentation`."""
    from scipy.io import loadmat

    if not path.is_file():
        raise MissingInputError(f"{path}: SBD label not found")
    try:
        mat = loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as err:  # scipy raises several types for a corrupt file
        raise InputError(f"{path}: unreadable .mat file ({err})") from None
    gt = mat.get("GTcls")
    seg = getattr(gt, "Segmentation", None)
    if seg is None:
        raise InputError(f"{path}: no GTcls.Segmentation in this .mat file")
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise InputError(f"{path}: GTcls.Segmentation has shape {seg.shape}; expected (H, W)")
    if seg.min() < 0 or seg.max() > 255:
        raise InputError(f"{path}: GTcls.Segmentation values outside 0..255")
    return seg.astype(np.uint8)


def _voc_one(task: tuple[Path, Path, Path, Path, bool]) -> list[int]:
    img_src, lbl_src, img_dst, lbl_dst, link = task
    raw = read_sbd_mat(lbl_src) if lbl_src.suffix == ".mat" else read_label_png(lbl_src)
    label = convert_voc_label(raw, lbl_src)
    check_same_size(img_src, lbl_src, label)
    write_label_png(lbl_dst, label)
    place_image(img_src, img_dst, link)
    return _present(label)


def voc12_aug_splits(src: str | Path) -> dict[str, list[str]]:
    """train = VOC train + SBD train + SBD val - VOC val (10,582); val = VOC val (1,449)."""
    src = Path(src)
    sets = src / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    sbd = src / "benchmark_RELEASE" / "dataset"
    voc_train, voc_val = _read_ids(sets / "train.txt"), _read_ids(sets / "val.txt")
    sbd_all = _read_ids(sbd / "train.txt") + _read_ids(sbd / "val.txt")
    train = sorted((set(voc_train) | set(sbd_all)) - set(voc_val))
    return {"train": train, "val": voc_val}


def convert_voc12_aug(
    src: str | Path, out: str | Path, *, workers: int = 1, link: bool = True, force: bool = False
) -> dict[str, int]:
    """VOC 2012 + SBD aug -> common format; returns {split: number of images}.

    Labels come from VOC's SegmentationClass PNG where one exists (the finer VOC masks,
    with their 255 boundaries), else from SBD's `cls/<id>.mat`; images from VOC's
    JPEGImages (SBD's `img/` as a fallback).
    """
    src, out = Path(src), Path(out)
    if not _start(out, force):
        return _counts(out, ("train", "val"))
    voc = src / "VOCdevkit" / "VOC2012"
    sbd = src / "benchmark_RELEASE" / "dataset"
    counts = {}
    for split, ids in voc12_aug_splits(src).items():
        tasks = []
        for i in ids:
            lbl = voc / "SegmentationClass" / f"{i}.png"
            if not lbl.is_file():
                lbl = sbd / "cls" / f"{i}.mat"
                if not lbl.is_file():
                    raise MissingInputError(
                        f"{voc / 'SegmentationClass' / (i + '.png')}: label not found "
                        f"(nor {lbl}) for {split} id {i}"
                    )
            img = voc / "JPEGImages" / f"{i}.jpg"
            if not img.is_file() and (sbd / "img" / f"{i}.jpg").is_file():
                img = sbd / "img" / f"{i}.jpg"
            tasks.append((img, lbl, out / "images" / split / f"{i}.jpg",
                          out / "labels" / split / f"{i}.png", link))
        presence = _map_all(_voc_one, tasks, workers, f"voc12 {split}")
        write_split(out, split, ids, dict(zip(ids, presence)))
        counts[split] = len(ids)
    write_dataset_json(out, "voc12", VOC_CLASSES)
    return counts


# --- PASCAL Context 59 (Detail API json) --------------------------------------------------


def _rle_counts_from_string(s: str) -> list[int]:
    """Decode the COCO compressed-RLE string: 6-bit groups (char - 48), 5 data bits + a
    continuation bit, sign-extended; from the third count on, each value is a delta from
    the count two places before."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise InputError("truncated RLE string")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_rle(rle: dict, height: int | None = None, width: int | None = None) -> np.ndarray:
    """COCO-style RLE ({"size": [h, w], "counts": str or list}) -> (h, w) bool mask.

    Runs alternate background/foreground starting with background, over the pixels in
    column-major (Fortran) order. Raises ValueError for a malformed mask.
    """
    if not isinstance(rle, dict) or "counts" not in rle:
        raise InputError("segmentation is not an RLE mask (expected a dict with 'counts')")
    h, w = (int(v) for v in rle.get("size", (height, width)))
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = _rle_counts_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise InputError(f"RLE runs cover {sum(runs)} pixels, mask has {h}x{w}={h * w}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((w, h)).T


def context59_lut(max_id: int = 460) -> np.ndarray:
    """(max_id,) uint8: Detail category id -> Context-59 train id, everything else 255."""
    lut = np.full(max_id, IGNORE_INDEX, dtype=np.uint8)
    for train_id, (_, cat_id) in enumerate(CONTEXT_59_DETAIL_IDS):
        lut[cat_id] = train_id
    return lut


def detail_class_mask(image: dict, anns: list[dict], where: str = "trainval_merged.json") -> np.ndarray:
    """The Detail API's semantic mask of one image: (H, W) int32 category ids, 0 unlabeled.

    Like `Detail.getMask(img)`: every segmentation annotation of the image, in file order,
    paints its category id over its RLE mask (later annotations win).
    """
    h, w = int(image["height"]), int(image["width"])
    mask = np.zeros((h, w), dtype=np.int32)
    for ann in anns:
        try:
            m = decode_rle(ann["segmentation"], h, w)
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(
                f"{where}: annotation {ann.get('id')} of image {image.get('image_id')}: {err}"
            ) from None
        if m.shape != (h, w):
            raise InputError(
                f"{where}: annotation {ann.get('id')} of image {image.get('image_id')} is "
                f"{m.shape[1]}x{m.shape[0]}, image is {w}x{h}"
            )
        mask[m] = int(ann["category_id"])
    return mask


def _context_one(task: tuple[dict, list[dict], Path, Path, Path, bool, str]) -> list[int]:
    image, anns, img_src, img_dst, lbl_dst, link, where = task
    mask = detail_class_mask(image, anns, where)
    lut = context59_lut(max(460, int(mask.max()) + 1))
    label = lut[mask]
    hw = image_size(img_src, f"{where}, image {image.get('image_id')}")
    if label.shape != hw:
        raise InputError(
            f"{where}: image {image.get('image_id')} is annotated as {label.shape[1]}x"
            f"{label.shape[0]} but {img_src} is {hw[1]}x{hw[0]}"
        )
    write_label_png(lbl_dst, label)
    place_image(img_src, img_dst, link)
    return _present(label)


def load_detail_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingInputError(f"{path}: Detail annotation file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    for key in ("images", "annos_segmentation"):
        if key not in data:
            raise InputError(f"{path}: missing key {key!r}; not a Detail API trainval_merged.json")
    cats = {c.get("category_id"): c.get("name") for c in data.get("categories", [])}
    if cats:
        missing = [cid for _, cid in CONTEXT_59_DETAIL_IDS if cid not in cats]
        if missing:
            raise InputError(f"{path}: categories lack the Context-59 ids {missing}")
    return data


def convert_pascal_context_59(
    src: str | Path,
    out: str | Path,
    *,
    json_path: str | Path | None = None,
    workers: int = 1,
    link: bool = True,
    force: bool = False,
) -> dict[str, int]:
    """PASCAL Context 59 from the Detail API json -> common format; {split: count}.

    Splits follow each image's `phase` ("train" 4,996 / "val" 5,104 images). Ids are the
    VOC file stems (2008_000002). The 459-class masks are mapped to the 59 classes; other
    categories and unlabeled pixels become 255.
    """
    src, out = Path(src), Path(out)
    json_path = Path(json_path) if json_path else src / "trainval_merged.json"
    if not json_path.is_file() and (src / "VOCdevkit" / "VOC2010" / "trainval_merged.json").is_file():
        json_path = src / "VOCdevkit" / "VOC2010" / "trainval_merged.json"
    if not _start(out, force):
        return _counts(out, ("train", "val"))
    data = load_detail_json(json_path)
    by_image: dict[int, list[dict]] = {}
    for ann in data["annos_segmentation"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    jpeg = src / "VOCdevkit" / "VOC2010" / "JPEGImages"
    counts = {}
    for split in ("train", "val"):
        images = sorted((im for im in data["images"] if im.get("phase") == split),
                        key=lambda im: im["file_name"])
        if not images:
            raise InputError(f"{json_path}: no images with phase {split!r}")
        ids = [Path(im["file_name"]).stem for im in images]
        tasks = [
            (im, by_image.get(im["image_id"], []), jpeg / im["file_name"],
             out / "images" / split / f"{i}.jpg", out / "labels" / split / f"{i}.png", link,
             str(json_path))
            for i, im in zip(ids, images)
        ]
        presence = _map_all(_context_one, tasks, workers, f"context59 {split}")
        write_split(out, split, ids, dict(zip(ids, presence)))
        counts[split] = len(ids)
    write_dataset_json(out, "pascal_context_59", [n for n, _ in CONTEXT_59_DETAIL_IDS])
    return counts


CONVERTERS: dict[str, Callable[..., dict[str, int]]] = {
    "coco_stuff_164k": convert_coco_stuff,
    "voc12": convert_voc12_aug,
    "pascal_context_59": convert_pascal_context_59,
}

__all__ = [
    "CONVERTERS",
    "convert_coco_stuff",
    "convert_coco_stuff_label",
    "convert_pascal_context_59",
    "convert_voc12_aug",
    "convert_voc_label",
    "decode_rle",
    "detail_class_mask",
    "read_sbd_mat",
    "voc12_aug_splits",
]
