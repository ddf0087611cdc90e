"""Your own data -> the common format (`cascade-clip prepare --dataset folder|coco`).

Two inputs (README: Your own data):

- **folder**: a folder of images, a folder of single-channel PNG masks with the same stems
  (mode L or P; value i = class i, 255 = ignore), a class-name file (line i names class i)
  and, optionally, split lists (one image stem per line). The images folder is flat, or
  holds one subfolder per split (the masks folder then the same subfolders). Without split
  lists a flat folder is split by sorted stem: every n-th image (n = 1 / val_fraction) is
  `val`, the rest `train`.
- **coco**: COCO-format annotations, one JSON per split, instances (polygons or RLE,
  through pycocotools) or panoptic (PNG segments, RGB id = R + 256 G + 256^2 B). Categories
  sorted by id are the classes; pixels no annotation covers are ignored (255); instances
  paint crowd regions first, then the others in file order (later ones win).

Everything that can be checked before a pixel is read is checked first (names, pairs,
lists); then each mask as it is converted. Bad input is one InputError naming the file (and
line or annotation), and no dataset.json is written, so nothing is taken for finished.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cascade_clip.data import IGNORE_INDEX, MAX_BYTE_CLASSES
from cascade_clip.data.convert import (
    _map_all,
    _present,
    _start,
    check_same_size,
    convert_label_folders,
    decode_rle,
    image_size,
    place_image,
    write_dataset_json,
    write_label_png,
    write_split,
)
from cascade_clip.errors import InputError, MissingInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FORMATS = ("folder", "coco")


# --- the class-name file ----------------------------------------------------------------------


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a file, line i = class i (trailing blank lines allowed). An empty or
    repeated name, or more classes than a byte label holds, is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: class-name file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise InputError(f"{path}: no class names (one per line, line i names class i)")
    first: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise InputError(f"{path}:{number}: empty class name (line {number} names class {number - 1})")
        if name in first:
            raise InputError(f"{path}:{number}: class name {name!r} repeats line {first[name]}")
        first[name] = number
    names = [line.strip() for line in lines]
    _check_class_count(len(names), path)
    return names


def _check_class_count(count: int, where: Path | str) -> None:
    if count > MAX_BYTE_CLASSES:
        raise InputError(f"{where}: {count} classes; your own data may have at most {MAX_BYTE_CLASSES} "
                         f"(mask ids 0..{MAX_BYTE_CLASSES - 1}, {IGNORE_INDEX} = ignore)")


# --- folder -----------------------------------------------------------------------------------


def _by_stem(folder: Path, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    """{stem: file} of the files in `folder` with one of `suffixes` (case-insensitive); two
    files of one stem are an error naming both."""
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in out:
                raise InputError(f"{path}: a second {what} named {path.stem!r} "
                                 f"(beside {out[path.stem].name})")
            out[path.stem] = path
    return out


def _pairs(images: Path, masks: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Images and masks of one folder pair, every image with its mask and vice versa."""
    if not masks.is_dir():
        raise MissingInputError(f"{masks}: masks folder not found")
    imgs = _by_stem(images, IMAGE_SUFFIXES, "image")
    pngs = _by_stem(masks, (".png",), "mask")
    if not imgs:
        raise InputError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    for stem, path in imgs.items():
        if stem not in pngs:
            raise MissingInputError(f"{path}: image without a mask (expected {masks / (stem + '.png')})")
    for stem, path in pngs.items():
        if stem not in imgs:
            raise MissingInputError(f"{path}: mask without an image (no {stem}.* in {images})")
    return imgs, pngs


def _read_list(path: Path, known: dict[str, Path], images: Path) -> list[str]:
    if not path.is_file():
        raise MissingInputError(f"{path}: split list not found")
    ids: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stem = line.strip()
        if not stem:
            continue
        stem = Path(stem).stem if Path(stem).suffix.lower() in IMAGE_SUFFIXES else stem
        if stem not in known:
            raise InputError(f"{path}:{number}: names {stem!r}, which is not an image in {images}")
        if stem in ids:
            raise InputError(f"{path}:{number}: {stem!r} is listed twice")
        ids.append(stem)
    if not ids:
        raise InputError(f"{path}: split list is empty")
    return ids


def folder_splits(
    images: Path, masks: Path, lists: dict[str, str | Path] | None, val_fraction: float
) -> dict[str, tuple[Path, Path, list[str], str]]:
    """{split: (image folder, mask folder, stems, image suffix)} of a folder dataset."""
    if not images.is_dir():
        raise MissingInputError(f"{images}: images folder not found")
    subfolders = sorted(p for p in images.iterdir() if p.is_dir())
    if subfolders and not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in images.iterdir()):
        if lists:
            raise InputError(f"{images}: holds one subfolder per split; split lists are for a flat folder")
        out = {}
        for sub in subfolders:
            imgs, _ = _pairs(sub, masks / sub.name)
            out[sub.name] = (sub, masks / sub.name, sorted(imgs), _suffix(imgs, sub))
        return out
    imgs, _ = _pairs(images, masks)
    if lists:
        chosen = {split: _read_list(Path(path), imgs, images) for split, path in lists.items()}
        owner: dict[str, str] = {}
        for split, ids in chosen.items():
            for stem in ids:
                if stem in owner:
                    raise InputError(f"{lists[split]}: {stem!r} is in split {owner[stem]!r} too "
                                     f"({lists[owner[stem]]}); a split must hold images of its own")
                owner[stem] = split
    else:
        stems = sorted(imgs)
        every = max(2, round(1 / val_fraction))
        val = stems[every - 1 :: every]
        if not val:
            raise InputError(f"{images}: {len(stems)} images give no val image at val_fraction "
                             f"{val_fraction}; give split lists (dataset.source.splits)")
        chosen = {"train": [s for s in stems if s not in set(val)], "val": val}
    return {split: (images, masks, ids, _suffix({i: imgs[i] for i in ids}, images))
            for split, ids in chosen.items()}


def _suffix(imgs: dict[str, Path], folder: Path) -> str:
    suffixes = sorted({p.suffix for p in imgs.values()})
    if len(suffixes) > 1:
        a, b = (next(p for p in imgs.values() if p.suffix == s) for s in suffixes[:2])
        raise InputError(f"{folder}: images of several types ({a.name}, {b.name}, ...); convert them to one")
    return suffixes[0]


def _own_label(raw: np.ndarray, path: Path, num_classes: int, classes_file: str) -> np.ndarray:
    values = np.unique(raw)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise InputError(f"{path}: ids {[int(v) for v in bad[:8]]} are outside the class list "
                         f"({classes_file} names {num_classes} classes, ids 0..{num_classes - 1}; "
                         f"{IGNORE_INDEX} = ignore)")
    return raw


def convert_folder(
    images: str | Path,
    masks: str | Path,
    classes: str | Path,
    out: str | Path,
    name: str,
    *,
    splits: dict[str, str | Path] | None = None,
    val_fraction: float = 0.1,
    workers: int = 1,
    link: bool = True,
    force: bool = False,
) -> dict[str, int]:
    """A folder dataset (module doc) -> the common format at `out`; {split: count}."""
    images, masks, out = Path(images), Path(masks), Path(out)
    names = read_class_names(classes)
    layout = folder_splits(images, masks, splits, val_fraction)
    suffixes = {suffix for *_, suffix in layout.values()}
    if len(suffixes) > 1:
        raise InputError(f"{images}: the splits hold images of several types {sorted(suffixes)}; use one")
    if not _start(out, force):
        return {s: len((out / "splits" / f"{s}.txt").read_text().split()) for s in layout}
    to_label = functools.partial(_own_label, num_classes=len(names), classes_file=str(classes))
    pairs = {split: (image_dir, mask_dir, ids) for split, (image_dir, mask_dir, ids, _) in layout.items()}
    return convert_label_folders(out, name, names, pairs, to_label, image_suffix=suffixes.pop(),
                                 workers=workers, link=link)


# --- COCO format ------------------------------------------------------------------------------


def _load_coco(path: Path) -> dict:
    if not path.is_file():
        raise MissingInputError(f"{path}: COCO annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: top level must be an object")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise InputError(f"{path}: missing list(s) {missing}; not a COCO instances or panoptic file")
    return data


def coco_classes(path: Path, categories: list[dict]) -> tuple[list[str], dict[int, int]]:
    """(class names, {category id: train id}): categories sorted by id."""
    cats = sorted(categories, key=lambda c: c.get("id", 0))
    first: dict[str, int] = {}
    for c in cats:
        name = str(c.get("name") or "").strip()
        if not isinstance(c.get("id"), int):
            raise InputError(f"{path}: category {c!r} has no integer id")
        if not name:
            raise InputError(f"{path}: category {c['id']} has an empty name")
        if name in first:
            raise InputError(f"{path}: category {c['id']} repeats the name {name!r} "
                             f"of category {first[name]}")
        first[name] = c["id"]
    if not cats:
        raise InputError(f"{path}: no categories")
    _check_class_count(len(cats), path)
    return [str(c["name"]).strip() for c in cats], {c["id"]: i for i, c in enumerate(cats)}


def _located(folder: Path, split: str, file_name: str) -> Path:
    """`folder/<split>/<file_name>` when it exists, else `folder/<file_name>`."""
    per_split = folder / split / file_name
    return per_split if per_split.is_file() else folder / file_name


def _instances_label(task: tuple) -> np.ndarray:
    from pycocotools import mask as coco_mask

    image, anns, train_ids, where = task
    h, w = int(image["height"]), int(image["width"])
    label = np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
    for ann in sorted(anns, key=lambda a: not a.get("iscrowd", 0)):  # crowds first, stable
        segm = ann.get("segmentation")
        try:
            if isinstance(segm, dict):  # RLE, compressed or not
                mask = decode_rle(segm, h, w)
            else:  # polygons: [[x0, y0, x1, y1, ...], ...]
                with warnings.catch_warnings():  # pycocotools 2.0.11's own NumPy 2 copy= notice
                    warnings.simplefilter("ignore", DeprecationWarning)
                    mask = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(segm, h, w)))
        except (TypeError, ValueError, KeyError, IndexError) as err:
            raise InputError(f"{where}: annotation {ann.get('id')} of image {image['id']}: "
                             f"unreadable segmentation ({err})") from None
        if mask.shape != (h, w):
            raise InputError(f"{where}: annotation {ann.get('id')} is {mask.shape[1]}x{mask.shape[0]}, "
                             f"image {image['id']} is {w}x{h}")
        label[mask.astype(bool)] = train_ids[ann["category_id"]]
    return label


def _panoptic_label(task: tuple) -> np.ndarray:
    image, ann, png, train_ids, where = task
    if not png.is_file():
        raise MissingInputError(f"{png}: panoptic mask not found (image {image['file_name']} of {where})")
    try:
        with Image.open(png) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint32)
    except (OSError, SyntaxError) as err:
        raise InputError(f"{png}: unreadable panoptic mask ({err})") from None
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    label = np.full(ids.shape, IGNORE_INDEX, dtype=np.uint8)
    segments = {int(s["id"]): s for s in ann.get("segments_info", [])}
    unknown = sorted(set(np.unique(ids).tolist()) - set(segments) - {0})
    if unknown:
        raise InputError(f"{png}: segment ids {unknown[:8]} are not in the segments_info of {where}")
    for sid, seg in segments.items():
        if seg.get("category_id") not in train_ids:
            raise InputError(f"{where}: segment {sid} of {ann.get('file_name')}: category_id "
                             f"{seg.get('category_id')} is not a category")
        label[ids == sid] = train_ids[seg["category_id"]]
    return label


def _coco_one(task: tuple) -> list[int]:
    kind, img_src, img_dst, lbl_dst, link, label_task = task
    label = (_panoptic_label if kind == "panoptic" else _instances_label)(label_task)
    mask_path = label_task[2] if kind == "panoptic" else Path(label_task[3])
    check_same_size(img_src, mask_path, label)
    write_label_png(lbl_dst, label)
    place_image(img_src, img_dst, link)
    return _present(label)


def convert_coco_format(
    annotations: dict[str, str | Path],
    images: str | Path,
    out: str | Path,
    name: str,
    *,
    masks: str | Path | None = None,
    workers: int = 1,
    link: bool = True,
    force: bool = False,
) -> dict[str, int]:
    """COCO instances or panoptic JSON (one per split) -> the common format; {split: count}.
    Images are `images/<split>/<file_name>` or `images/<file_name>`; panoptic PNGs likewise
    under `masks`."""
    images, out = Path(images), Path(out)
    if not annotations:
        raise InputError("a COCO dataset needs at least one split's JSON (dataset.source.annotations)")
    loaded = {split: (Path(p), _load_coco(Path(p))) for split, p in annotations.items()}
    (first_path, first), *_ = loaded.values()
    names, train_ids = coco_classes(first_path, first["categories"])
    plans = {}
    for split, (path, data) in loaded.items():
        if coco_classes(path, data["categories"])[0] != names:
            raise InputError(f"{path}: categories differ from those of {first_path}")
        panoptic = bool(data["annotations"]) and "segments_info" in data["annotations"][0]
        if panoptic and masks is None:
            raise InputError(f"{path}: a panoptic file; give the folder of its PNGs (dataset.source.masks)")
        by_image: dict[int, list[dict]] = {}
        known = {im.get("id") for im in data["images"]}
        for ann in data["annotations"]:
            if ann.get("image_id") not in known:
                raise InputError(f"{path}: annotation {ann.get('id', ann.get('file_name'))} names image "
                                 f"{ann.get('image_id')}, which is not among its images")
            if not panoptic and ann.get("category_id") not in train_ids:
                raise InputError(f"{path}: annotation {ann.get('id')}: category_id {ann.get('category_id')} "
                                 f"is outside the class list ({len(names)} categories)")
            by_image.setdefault(ann["image_id"], []).append(ann)
        tasks, ids = [], []
        for im in sorted(data["images"], key=lambda im: im["file_name"]):
            img_src = _located(images, split, im["file_name"])
            image_size(img_src, path)  # a missing image is named now, before any is read
            stem = Path(im["file_name"]).stem
            dst = (out / "images" / split / f"{stem}{img_src.suffix}", out / "labels" / split / f"{stem}.png")
            if panoptic:
                anns = by_image.get(im["id"], [])
                if len(anns) != 1:
                    raise MissingInputError(f"{img_src}: image without a mask ({len(anns)} panoptic "
                                            f"annotations in {path})")
                png = _located(Path(masks), split, anns[0]["file_name"])
                tasks.append(("panoptic", img_src, *dst, link, (im, anns[0], png, train_ids, str(path))))
            else:
                tasks.append(("instances", img_src, *dst, link, (im, by_image.get(im["id"], []), train_ids,
                                                                  str(path))))
            ids.append(stem)
        if len(set(ids)) != len(ids):
            raise InputError(f"{path}: two images share a file name stem")
        if not ids:
            raise InputError(f"{path}: no images")
        plans[split] = (tasks, ids)
    suffixes = {t[1].suffix for tasks, _ in plans.values() for t in tasks}
    if len(suffixes) > 1:
        raise InputError(f"{images}: images of several types {sorted(suffixes)}; convert them to one")
    if not _start(out, force):
        return {s: len((out / "splits" / f"{s}.txt").read_text().split()) for s in plans}
    counts = {}
    for split, (tasks, ids) in plans.items():
        presence = _map_all(_coco_one, tasks, workers, f"{name} {split}")
        write_split(out, split, ids, dict(zip(ids, presence)))
        counts[split] = len(ids)
    write_dataset_json(out, name, names, suffixes.pop())
    return counts


def convert_own(source: dict, out: str | Path, name: str, **kwargs) -> dict[str, int]:
    """A config's `dataset.source` ({format, images, ...}) -> the common format at `out`."""
    fmt = source.get("format")
    if fmt == "folder":
        for key in ("masks", "classes"):
            if not source.get(key):
                raise InputError(f"dataset.source.{key}: a folder dataset needs it")
        return convert_folder(source["images"], source["masks"], source["classes"], out, name,
                              splits=source.get("splits"),
                              val_fraction=float(source.get("val_fraction", 0.1)), **kwargs)
    if fmt == "coco":
        return convert_coco_format(source.get("annotations") or {}, source["images"], out, name,
                                   masks=source.get("masks"), **kwargs)
    raise InputError(f"dataset.source.format: {fmt!r}; expected one of {list(FORMATS)}")
