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

The open-vocabulary suite's targets (docs/design.md: Data and the zero-shot protocol; class
lists and mappings as MMSegmentation and the detectron2 converters of MaskFormer, SAN and
CAT-Seg, cited in cascade_clip/data/classes/):

- VOC-21: VOC 2012 + SBD aug as above, background kept as train id 0.
- ADE20K-150: `ADEChallengeData2016/{images,annotations}/{training,validation}`; value v ->
  train id v - 1, 0 ignored.
- PASCAL Context-459: PASCAL-Context's own release, `trainval/<id>.mat` (`LabelMap`, 0
  unlabeled, 1..459) and `labels.txt`; LabelMap c -> train id c - 1, 0 -> 65535 (SAN's, CAT-Seg's
  and ODISE's `LabelMap - 1` in 16 bits); the `val` images of Context-59's Detail json and
  VOC 2010 JPEGs; val only, 16-bit labels. (Detail's json holds the 59 classes alone.)
- ADE20K-847: `ADE20K_2021_17_01/images/ADE/validation/**/ADE_val_*{.jpg,_seg.png}`; the
  class index R / 10 * 256 + G of each `_seg.png` pixel through MaskFormer's 847-class map,
  every other index ignored; as MaskFormer's converter (which SAN and CAT-Seg copy): images
  whose short side exceeds 512 resized to 512 with OpenCV (`cv2.resize`, INTER_LINEAR for the
  image, INTER_NEAREST for the label), every image re-saved as a JPEG by PIL at its default
  quality; val only, 16-bit labels.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cascade_clip.data import IGNORE_INDEX, IGNORE_INDEX_16
from cascade_clip.data.manifest import write_manifests
from cascade_clip.data.registry import (
    ADE20K_150,
    ADE20K_847_IDS,
    COCO_STUFF_171,
    COCO_STUFF_UNUSED_IDS,
    CONTEXT_59_DETAIL_IDS,
    CONTEXT_459,
    VOC_21,
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
    """Save a (H, W) uint8 array as a mode "L" PNG (a uint16 array: a 16-bit PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if label.dtype == np.uint16 else np.uint8
    Image.fromarray(np.ascontiguousarray(label, dtype=dtype)).save(path)  # 2-D: mode L or I;16


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
    write_manifests(out)


def _start(out: Path, force: bool) -> bool:
    """False when `out` already holds a finished conversion (and not forced)."""
    if (out / "dataset.json").is_file() and not force:
        return False
    out.mkdir(parents=True, exist_ok=True)
    if (out / "dataset.json").exists():
        (out / "dataset.json").unlink()
    return True


def _present(label: np.ndarray) -> list[int]:
    ignore = IGNORE_INDEX_16 if label.dtype == np.uint16 else IGNORE_INDEX
    return [int(v) for v in np.unique(label) if v != ignore]


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


def _pair_one(task: tuple[Callable, Path, Path, Path, Path, bool]) -> list[int]:
    """One image and its label PNG: map the label, check the sizes, write both."""
    to_label, img_src, map_src, img_dst, lbl_dst, link = task
    label = to_label(read_label_png(map_src), map_src)
    check_same_size(img_src, map_src, label)
    write_label_png(lbl_dst, label)
    place_image(img_src, img_dst, link)
    return _present(label)


def convert_label_folders(
    out: Path,
    name: str,
    classes: Sequence[str],
    splits: dict[str, tuple[Path, Path, list[str]]],
    to_label: Callable[[np.ndarray, Path], np.ndarray],
    *,
    image_suffix: str = ".jpg",
    workers: int = 1,
    link: bool = True,
) -> dict[str, int]:
    """Images with label PNGs of the same stem -> common format; {split: count}.

    `splits` maps output split -> (image folder, label folder, ids); `to_label(raw, path)`
    maps a PNG's raw values to train ids (raising InputError naming `path` for a value it
    does not know). Writes dataset.json last.
    """
    counts = {}
    for split, (images, labels, ids) in splits.items():
        tasks = [
            (to_label, images / f"{i}{image_suffix}", labels / f"{i}.png",
             out / "images" / split / f"{i}{image_suffix}", out / "labels" / split / f"{i}.png", link)
            for i in ids
        ]
        presence = _map_all(_pair_one, tasks, workers, f"{name} {split}")
        write_split(out, split, ids, dict(zip(ids, presence)))
        counts[split] = len(ids)
    write_dataset_json(out, name, classes, image_suffix)
    return counts


def _png_ids(folder: Path, what: str) -> list[str]:
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: {what} folder not found")
    ids = sorted(p.stem for p in folder.glob("*.png"))
    if not ids:
        raise InputError(f"{folder}: no label PNGs found")
    return ids


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
    pairs = {split: (src / "images" / folder, src / "stuffthingmaps" / folder,
                     _png_ids(src / "stuffthingmaps" / folder, "stuffthingmaps"))
             for split, folder in splits.items()}
    return convert_label_folders(out, "coco_stuff_164k", COCO_STUFF_171, pairs, convert_coco_stuff_label,
                                 workers=workers, link=link)


def _counts(out: Path, splits: Iterable[str]) -> dict[str, int]:
    return {s: len(_read_ids(out / "splits" / f"{s}.txt")) for s in splits}


# --- PASCAL VOC 2012 + SBD aug ------------------------------------------------------------


def convert_voc_label(label: np.ndarray, path: Path | str = "label", background: bool = False) -> np.ndarray:
    """VOC/SBD class indices -> 20 train ids: 0 background -> 255, c -> c-1, 255 stays.
    With `background` (VOC-21) the indices are the train ids: background is class 0."""
    values = np.unique(label)
    bad = [int(v) for v in values if 20 < v < 255]
    if bad:
        raise InputError(f"{path}: values {bad} are not VOC class indices 0..20 or 255")
    if background:
        return np.asarray(label, dtype=np.uint8)
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


def _voc_one(task: tuple[Path, Path, Path, Path, bool, bool]) -> list[int]:
    img_src, lbl_src, img_dst, lbl_dst, link, background = task
    raw = read_sbd_mat(lbl_src) if lbl_src.suffix == ".mat" else read_label_png(lbl_src)
    label = convert_voc_label(raw, lbl_src, background)
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
    src: str | Path,
    out: str | Path,
    *,
    background: bool = False,
    workers: int = 1,
    link: bool = True,
    force: bool = False,
) -> dict[str, int]:
    """VOC 2012 + SBD aug -> common format; returns {split: number of images}.

    Labels come from VOC's SegmentationClass PNG where one exists (the finer VOC masks,
    with their 255 boundaries), else from SBD's `cls/<id>.mat`; images from VOC's
    JPEGImages (SBD's `img/` as a fallback). `background`: VOC-21 (background kept as
    class 0), else the 20 classes with background ignored.
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
                          out / "labels" / split / f"{i}.png", link, background))
        name = "voc21" if background else "voc12"
        presence = _map_all(_voc_one, tasks, workers, f"{name} {split}")
        write_split(out, split, ids, dict(zip(ids, presence)))
        counts[split] = len(ids)
    write_dataset_json(out, "voc21" if background else "voc12", VOC_21 if background else VOC_CLASSES)
    return counts


def convert_voc21(src: str | Path, out: str | Path, **kwargs) -> dict[str, int]:
    """VOC 2012 + SBD aug with background (VOC-21) -> common format, from voc12's download."""
    return convert_voc12_aug(src, out, background=True, **kwargs)


# --- PASCAL Context 59 (Detail API json) ---------------------------------------------------


def decode_rle(rle: dict, height: int | None = None, width: int | None = None) -> np.ndarray:
    """COCO-style RLE ({"size": [h, w], "counts": str or list}) -> (h, w) bool mask, through
    pycocotools (column-major runs, background first).

    Runs that do not cover the h x w pixels exactly are refused: a list is summed; a
    compressed string, after which pycocotools leaves the pixels of a short one undefined,
    must encode back to itself (the canonical encoding pycocotools and the Detail API
    write). Raises InputError for a malformed mask.
    """
    from pycocotools import mask as coco_mask

    if not isinstance(rle, dict) or "counts" not in rle:
        raise InputError("segmentation is not an RLE mask (expected a dict with 'counts')")
    h, w = (int(v) for v in rle.get("size", (height, width)))
    counts = rle["counts"]
    if isinstance(counts, list):
        runs = [int(c) for c in counts]
        if any(r < 0 for r in runs) or sum(runs) != h * w:
            raise InputError(f"RLE runs cover {sum(runs)} pixels, mask has {h}x{w}={h * w}")
        encoded = coco_mask.frPyObjects({"size": [h, w], "counts": runs}, h, w)
    elif isinstance(counts, (str, bytes)):
        encoded = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise InputError(f"RLE counts must be a string or a list, got {type(counts).__name__}")
    try:
        with warnings.catch_warnings():  # pycocotools 2.0.11's own NumPy 2 copy= notice
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = coco_mask.decode(encoded)
    except ValueError as err:  # runs beyond the mask
        raise InputError(f"malformed RLE for a {h}x{w} mask ({err})") from None
    if isinstance(counts, list):
        return mask.astype(bool)
    if coco_mask.encode(np.asfortranarray(mask))["counts"] != encoded["counts"]:
        raise InputError(f"RLE runs do not cover the {h}x{w} mask exactly")
    return mask.astype(bool)


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


def context59_label(mask: np.ndarray, where: str = "trainval_merged.json") -> np.ndarray:
    """Detail category ids -> Context-59 train ids (uint8; other categories and unlabeled 255)."""
    return context59_lut(max(460, int(mask.max()) + 1))[mask]


def _context_one(task: tuple[Callable, dict, list[dict], Path, Path, Path, bool, str]) -> list[int]:
    to_label, image, anns, img_src, img_dst, lbl_dst, link, where = task
    label = to_label(detail_class_mask(image, anns, where), where)
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


def detail_json_path(src: Path, json_path: str | Path | None = None) -> Path:
    """Where a Context download keeps trainval_merged.json (its top level, or beside VOC2010)."""
    if json_path:
        return Path(json_path)
    top, beside = src / "trainval_merged.json", src / "VOCdevkit" / "VOC2010" / "trainval_merged.json"
    return beside if not top.is_file() and beside.is_file() else top


def _convert_detail(
    src: Path,
    out: Path,
    name: str,
    classes: Sequence[str],
    to_label: Callable[[np.ndarray, str], np.ndarray],
    splits: Sequence[str],
    json_path: str | Path | None,
    workers: int,
    link: bool,
) -> dict[str, int]:
    """The Detail json's masks of each image of `splits` (by `phase`) through `to_label`."""
    json_path = detail_json_path(src, json_path)
    data = load_detail_json(json_path)
    by_image: dict[int, list[dict]] = {}
    for ann in data["annos_segmentation"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    jpeg = src / "VOCdevkit" / "VOC2010" / "JPEGImages"
    counts = {}
    for split in splits:
        images = sorted((im for im in data["images"] if im.get("phase") == split),
                        key=lambda im: im["file_name"])
        if not images:
            raise InputError(f"{json_path}: no images with phase {split!r}")
        ids = [Path(im["file_name"]).stem for im in images]
        tasks = [
            (to_label, im, by_image.get(im["image_id"], []), jpeg / im["file_name"],
             out / "images" / split / f"{i}.jpg", out / "labels" / split / f"{i}.png", link,
             str(json_path))
            for i, im in zip(ids, images)
        ]
        presence = _map_all(_context_one, tasks, workers, f"{name} {split}")
        write_split(out, split, ids, dict(zip(ids, presence)))
        counts[split] = len(ids)
    write_dataset_json(out, name, classes)
    return counts


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
    if not _start(out, force):
        return _counts(out, ("train", "val"))
    return _convert_detail(src, out, "pascal_context_59", [n for n, _ in CONTEXT_59_DETAIL_IDS],
                           context59_label, ("train", "val"), json_path, workers, link)


# --- PASCAL Context-459 (PASCAL-Context's own release) --------------------------------------


def read_context_labelmap(path: Path) -> np.ndarray:
    """PASCAL-Context `trainval/<id>.mat` -> its (H, W) integer `LabelMap` (0 unlabeled, 1..459)."""
    from scipy.io import loadmat

    if not path.is_file():
        raise MissingInputError(f"{path}: PASCAL-Context label map not found")
    try:
        mat = loadmat(path)
    except Exception as err:  # scipy raises several types for a corrupt file
        raise InputError(f"{path}: unreadable .mat file ({err})") from None
    labelmap = mat.get("LabelMap")
    if labelmap is None:
        raise InputError(f"{path}: no LabelMap in this .mat file")
    labelmap = np.asarray(labelmap)
    if labelmap.ndim != 2 or labelmap.dtype.kind not in "iu":
        raise InputError(f"{path}: LabelMap is {labelmap.dtype} {labelmap.shape}; expected (H, W) integers")
    return labelmap


def context459_label(labelmap: np.ndarray, path: Path | str = "LabelMap") -> np.ndarray:
    """A LabelMap (0 unlabeled, c = 1..459 the line of labels.txt) -> Context-459 train ids,
    uint16: c - 1, unlabeled 65535 (the peers' `LabelMap - 1` in 16 bits)."""
    values = np.unique(labelmap)
    bad = [int(v) for v in values if v < 0 or v > len(CONTEXT_459)]
    if bad:
        raise InputError(f"{path}: LabelMap values {bad[:5]} are outside 0..{len(CONTEXT_459)}")
    labelmap = labelmap.astype(np.int64)
    return np.where(labelmap == 0, IGNORE_INDEX_16, labelmap - 1).astype(np.uint16)


def _name_key(name: str) -> str:
    """Names compared without case, spaces or punctuation ("air conditioner" = "airconditioner")."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def check_context459_labels(path: Path) -> None:
    """labels.txt (`<c>: <name>` lines, c = 1..459) must name the registry's 459 classes in
    order (spelling aside: SAN splits words that CAT-Seg joins); InputError naming the line."""
    if not path.is_file():
        raise MissingInputError(f"{path}: PASCAL-Context labels.txt not found (it comes in trainval.tar.gz)")
    entries = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        index, sep, name = line.partition(":")
        if sep and index.strip().isdigit():
            entries.append((lineno, int(index), name.strip()))
    if [i for _, i, _ in entries] != list(range(1, len(CONTEXT_459) + 1)):
        raise InputError(f"{path}: expected lines '1: <name>' .. '{len(CONTEXT_459)}: <name>', "
                         f"found {len(entries)} numbered lines")
    for (lineno, index, name), ours in zip(entries, CONTEXT_459):
        if _name_key(name) != _name_key(ours):
            raise InputError(f"{path}:{lineno}: class {index} is {name!r}, the registry's {ours!r} "
                             "(cascade_clip/data/classes/pascal_context_459.txt)")


def _context459_one(task: tuple[Path, Path, Path, Path, bool]) -> list[int]:
    img_src, mat, img_dst, lbl_dst, link = task
    label = context459_label(read_context_labelmap(mat), mat)
    check_same_size(img_src, mat, label)
    write_label_png(lbl_dst, label)
    place_image(img_src, img_dst, link)
    return _present(label)


def convert_pascal_context_459(
    src: str | Path,
    out: str | Path,
    *,
    context59: str | Path | None = None,
    json_path: str | Path | None = None,
    workers: int = 1,
    link: bool = True,
    force: bool = False,
) -> dict[str, int]:
    """PASCAL Context-459 (an evaluation target) -> common format; {"val": count}.

    Labels from PASCAL-Context's release in `src` (`trainval/<id>.mat`, `labels.txt`); the
    images and the val list (Detail's `val` phase, 5,104 images, the list SAN, CAT-Seg and
    ODISE evaluate) from Context-59's download, `context59` (default: `src`'s sibling folder
    pascal_context_59). 16-bit labels, c -> c - 1, unlabeled 65535."""
    src, out = Path(src), Path(out)
    context59 = Path(context59) if context59 else src.parent / "pascal_context_59"
    if not _start(out, force):
        return _counts(out, ("val",))
    check_context459_labels(src / "labels.txt")
    json_file = detail_json_path(context59, json_path)
    data = load_detail_json(json_file)
    images = sorted(im["file_name"] for im in data["images"] if im.get("phase") == "val")
    if not images:
        raise InputError(f"{json_file}: no images with phase 'val'")
    ids = [Path(name).stem for name in images]
    jpeg = context59 / "VOCdevkit" / "VOC2010" / "JPEGImages"
    tasks = [(jpeg / name, src / "trainval" / f"{i}.mat", out / "images" / "val" / f"{i}.jpg",
              out / "labels" / "val" / f"{i}.png", link) for i, name in zip(ids, images)]
    presence = _map_all(_context459_one, tasks, workers, "pascal_context_459 val")
    write_split(out, "val", ids, dict(zip(ids, presence)))
    write_dataset_json(out, "pascal_context_459", CONTEXT_459)
    return {"val": len(ids)}


# --- ADE20K-150 (ADEChallengeData2016) ----------------------------------------------------


def convert_ade20k_150_label(label: np.ndarray, path: Path | str = "label") -> np.ndarray:
    """ADEChallengeData2016 annotation (0 other, 1..150) -> 150 train ids (v - 1, 0 -> 255)."""
    values = np.unique(label)
    bad = [int(v) for v in values if v > len(ADE20K_150)]
    if bad:
        raise InputError(f"{path}: values {bad} are not ADE20K-150 classes 0..150")
    return (np.asarray(label, dtype=np.uint8) - np.uint8(1)).astype(np.uint8)  # 0 wraps to 255


def convert_ade20k_150(
    src: str | Path, out: str | Path, *, workers: int = 1, link: bool = True, force: bool = False
) -> dict[str, int]:
    """ADE20K-150 -> common format: train <- training (20,210), val <- validation (2,000);
    ids are the file stems (ADE_val_00000001)."""
    src, out = Path(src), Path(out)
    if not _start(out, force):
        return _counts(out, ("train", "val"))
    root = src / "ADEChallengeData2016"
    pairs = {split: (root / "images" / folder, root / "annotations" / folder,
                     _png_ids(root / "annotations" / folder, "ADE20K annotations"))
             for split, folder in (("train", "training"), ("val", "validation"))}
    return convert_label_folders(out, "ade20k_150", ADE20K_150, pairs, convert_ade20k_150_label,
                                 workers=workers, link=link)


# --- ADE20K-847 (ADE20K_2021_17_01, the full dataset) -----------------------------------------

ADE20K_847_MAX_SIZE = 512  # MaskFormer's converter shrinks a short side above this to it


def ade20k_847_lut() -> np.ndarray:
    """(26 * 256,) uint16: ADE20K object class index (R / 10 * 256 + G) -> 847 train ids,
    every index MaskFormer's list lacks (0 = unlabeled included) 65535."""
    lut = np.full(26 * 256, IGNORE_INDEX_16, dtype=np.uint16)
    for train_id, (index, _) in enumerate(ADE20K_847_IDS):
        lut[index] = train_id
    return lut


def read_ade_seg(path: Path) -> np.ndarray:
    """An ADE20K full `*_seg.png` -> (H, W) int32 object class indices (R / 10 * 256 + G)."""
    if not path.is_file():
        raise MissingInputError(f"{path}: ADE20K segmentation PNG not found")
    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                raise InputError(f"{path}: mode {im.mode!r}; an ADE20K *_seg.png is RGB")
            seg = np.asarray(im, dtype=np.int32)
    except (OSError, SyntaxError) as err:
        raise InputError(f"{path}: unreadable segmentation ({err})") from None
    return seg[..., 0] // 10 * 256 + seg[..., 1]


def ade20k_847_size(h: int, w: int, max_size: int = ADE20K_847_MAX_SIZE) -> tuple[int, int] | None:
    """The (h, w) MaskFormer's converter resizes an image to, or None to keep it."""
    if w >= h > max_size:
        return max_size, round(w / float(h) * max_size)
    if h >= w > max_size:
        return round(h / float(w) * max_size), max_size
    return None


def ade20k_847_resize(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) as MaskFormer's converter leaves them: a short side above 512 shrunk to
    512 by OpenCV, the image with INTER_LINEAR (no antialiasing, OpenCV's fixed-point
    weights), the label with INTER_NEAREST (source pixel floor(x * src / dst))."""
    import cv2

    size = ade20k_847_size(*label.shape)
    if size is None:
        return image, label
    h, w = size
    return (cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR),
            cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST))


def _ade847_one(task: tuple[Path, Path, Path, Path, bool]) -> list[int]:
    img_src, seg_src, img_dst, lbl_dst, _ = task
    label = ade20k_847_lut()[read_ade_seg(seg_src)]
    hw = image_size(img_src, seg_src)
    if label.shape != hw:
        raise InputError(f"{seg_src}: segmentation size {label.shape[1]}x{label.shape[0]} differs "
                         f"from image {img_src} size {hw[1]}x{hw[0]}")
    with Image.open(img_src) as im:  # as read there: grey stays grey
        image = np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))
    image, label = ade20k_847_resize(image, label)
    img_dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(img_dst)  # every image re-saved, PIL's default JPEG quality, as there
    write_label_png(lbl_dst, label)
    return _present(label)


def convert_ade20k_847(
    src: str | Path, out: str | Path, *, workers: int = 1, link: bool = True, force: bool = False
) -> dict[str, int]:
    """ADE20K-847 (an evaluation target) -> common format: the `val` split from
    `ADE20K_2021_17_01/images/ADE/validation` (every `ADE_val_*.jpg` beside its `_seg.png`,
    2,000 images), 16-bit labels, images re-encoded (`ade20k_847_resize`; `link` is unused).
    The release's index_ade20k.pkl lists the same files; it is not read (a pickle runs code
    when loaded)."""
    src, out = Path(src), Path(out)
    if not _start(out, force):
        return _counts(out, ("val",))
    folder = src / "ADE20K_2021_17_01" / "images" / "ADE" / "validation"
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: ADE20K_2021_17_01 validation folder not found")
    images = sorted(folder.rglob("ADE_val_*.jpg"), key=lambda p: p.stem)
    if not images:
        raise InputError(f"{folder}: no ADE_val_*.jpg images found")
    ids = [p.stem for p in images]
    if len(set(ids)) != len(ids):
        raise InputError(f"{folder}: an image name occurs in two scene folders")
    tasks = [(p, p.with_name(f"{p.stem}_seg.png"), out / "images" / "val" / f"{p.stem}.jpg",
              out / "labels" / "val" / f"{p.stem}.png", link) for p in images]
    presence = _map_all(_ade847_one, tasks, workers, "ade20k_847 val")
    write_split(out, "val", ids, dict(zip(ids, presence)))
    write_dataset_json(out, "ade20k_847", [name for _, name in ADE20K_847_IDS])
    return {"val": len(ids)}


CONVERTERS: dict[str, Callable[..., dict[str, int]]] = {
    "coco_stuff_164k": convert_coco_stuff,
    "voc12": convert_voc12_aug,
    "pascal_context_59": convert_pascal_context_59,
    "voc21": convert_voc21,
    "ade20k_150": convert_ade20k_150,
    "pascal_context_459": convert_pascal_context_459,
    "ade20k_847": convert_ade20k_847,
}

__all__ = [
    "CONVERTERS",
    "convert_ade20k_150",
    "convert_ade20k_847",
    "convert_coco_stuff",
    "convert_coco_stuff_label",
    "convert_label_folders",
    "convert_pascal_context_459",
    "convert_pascal_context_59",
    "convert_voc12_aug",
    "convert_voc21",
    "convert_voc_label",
    "decode_rle",
    "detail_class_mask",
    "read_sbd_mat",
    "voc12_aug_splits",
]
