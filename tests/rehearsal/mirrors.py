"""Miniature mirrors of the real datasets' downloads, written by the tests (never downloaded).

Each builder writes the archives `cascade_clip/data/sources.yaml` names, with the real
internal layouts the converters (`cascade_clip/data/convert.py`) read, a handful of small
images each, and every class of the dataset present somewhere (unseen ones included):

- COCO-Stuff 164K: `train2017.zip` / `val2017.zip` (folders `train2017/`, `val2017/` of
  JPEGs) and `stuffthingmaps_trainval2017.zip` (`train2017/`, `val2017/` of single-channel
  PNGs, COCO-Stuff ids 0..181 with 255 unlabeled; the 11 unused thing ids never occur).
- VOC 2012 + SBD: `VOCtrainval_11-May-2012.tar` (`VOCdevkit/VOC2012/` with JPEGImages,
  palette SegmentationClass PNGs with 255 boundaries, ImageSets/Segmentation lists) and
  `benchmark.tgz` (`benchmark_RELEASE/dataset/` with `cls/*.mat` GTcls structs, `img/`,
  `train.txt`, `val.txt`). The lists overlap as the real ones do: an SBD image that is in
  VOC's val list must leave the augmented train set.
- PASCAL Context 59: `VOCtrainval_03-May-2010.tar` (`VOCdevkit/VOC2010/JPEGImages`) and
  `trainval_merged.json` in the Detail API's layout (images with `phase`, all 459 categories
  listed, `annos_segmentation` with compressed RLE strings for the 59 classes only, as the
  real file holds, later annotations painting over earlier ones).
- PASCAL Context-459: PASCAL-Context's own `trainval.tar.gz` (`trainval/<id>.mat` per train and
  val image of the Context miniature, a MATLAB 5 `LabelMap` of uint16 holding every class
  1..459 and 0 unlabeled; `labels.txt`, `<c>: <name>` lines); its images and val list are
  Context-59's.
- ADE20K-150: `ADEChallengeData2016.zip` (`ADEChallengeData2016/images/{training,validation}`
  JPEGs, `annotations/...` PNGs with 0 = other and 1..150, `sceneCategories.txt`).
- ADE20K-847: `ADE20K_2021_17_01.zip` (`ADE20K_2021_17_01/images/ADE/{training,validation}/
  <scene>/ADE_*.jpg` beside RGB `_seg.png` files whose R / 10 * 256 + G is the object class
  index, B the instance; `index_ade20k.pkl`, `objects.txt`), which the user brings
  (`sources.local`): the sources list it with its registration page and no URL. Its first
  validation image is larger than 512 px on its short side, as most of ADE20K's are.
- VOC-21 has no files of its own: VOC's mirror is its (`DERIVED`).

`write_mirror(folder)` builds them all and a sources YAML in the packaged format (the same
file names and `extract_to` folders, the mirror's URL and sha256 for every file);
`http_mirror` serves a folder on 127.0.0.1 only (HTTP Range, so resumption works too).
`random_clip_weights` writes a seeded random open_clip CLIP's state dict (the key names of
OpenAI's CLIP state dict, which open_clip keeps) for `clip.pretrained: <file>`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from cascade_clip.data.registry import (
    ADE20K_150,
    ADE20K_847_IDS,
    COCO_STUFF_UNUSED_IDS,
    CONTEXT_59_DETAIL_IDS,
    CONTEXT_459,
    DOWNLOAD_OF,
)
from cascade_clip.download import load_sources

FIXED_MTIME = 1_300_000_000  # archive members get a fixed time: the same bytes on every build

# --- image and label files ---------------------------------------------------------------------


def jpeg_bytes(h: int, w: int, seed: int) -> bytes:
    """A random RGB JPEG of h x w."""
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(label: np.ndarray, palette: bool = False) -> bytes:
    """A single-channel PNG of `label`: mode L, or mode P with a colour map (VOC's
    SegmentationClass files are palette images whose pixel values are the class indices)."""
    im = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
    if palette:
        im = Image.frombytes("P", im.size, im.tobytes())
        im.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, i)])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def sbd_mat_bytes(seg: np.ndarray) -> bytes:
    """An SBD `cls/<id>.mat`: a GTcls struct with Segmentation (H, W) uint8 class indices,
    Boundaries (a 20-cell array) and CategoriesPresent, as MATLAB 5 writes it."""
    from scipy.io import savemat

    gt = {"Segmentation": seg.astype(np.uint8), "Boundaries": np.zeros((20, 1), dtype=object),
          "CategoriesPresent": np.unique(seg[(seg > 0) & (seg < 255)]).astype(np.uint8)}
    buf = io.BytesIO()
    savemat(buf, {"GTcls": gt})
    data = buf.getvalue()
    # The 116-byte text header carries the creation time: a fixed one keeps builds identical.
    header = b"MATLAB 5.0 MAT-file, Platform: posix, Created on: Sun Apr 10 00:00:00 2011"
    return header.ljust(116) + data[116:]


def context_mat_bytes(labelmap: np.ndarray) -> bytes:
    """A PASCAL-Context `trainval/<id>.mat`: `LabelMap` (H, W) uint16, as MATLAB 5 writes it."""
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, {"LabelMap": labelmap.astype(np.uint16)})
    header = b"MATLAB 5.0 MAT-file, Platform: posix, Created on: Sat May 03 00:00:00 2014"
    return header.ljust(116) + buf.getvalue()[116:]


def block_label(h: int, w: int, block: int, values: Sequence[int], fill: int, seed: int,
                dtype: type = np.uint8) -> np.ndarray:
    """(h, w) `dtype`: a grid of block x block cells, each value of `values` in one cell (in
    an order shuffled by `seed`), the remaining cells `fill`."""
    rows, cols = -(-h // block), -(-w // block)
    if len(values) > rows * cols:
        raise ValueError(f"{len(values)} values do not fit {rows}x{cols} cells")
    cells = np.full(rows * cols, fill, dtype=dtype)
    cells[: len(values)] = values
    cells = np.random.default_rng(seed).permutation(cells).reshape(rows, cols)
    return np.kron(cells, np.ones((block, block), dtype))[:h, :w]


def fitting_block(spec: MirrorSpec, count: int) -> int:
    """The spec's block size, halved until `count` cells fit the image."""
    block = spec.block
    while block > 1 and -(-spec.height // block) * -(-spec.width // block) < count:
        block //= 2
    return block


# --- COCO compressed RLE (the Detail API's masks) -------------------------------------------


def mask_runs(mask: np.ndarray) -> list[int]:
    """Run lengths of a (h, w) bool mask in column-major order, starting with a background run."""
    flat = np.asarray(mask, bool).T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def rle_string(runs: Sequence[int]) -> str:
    """COCO's compressed RLE string of `runs`: from the third run on, each is stored as the
    difference to the run two places before; values in 5-bit groups, low first, each char
    48 + group + 32 when more groups follow, the last group's bit 4 the sign."""
    out = []
    for i, run in enumerate(runs):
        x = int(run) - (int(runs[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: -1 stays -1
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(48 + (c | (0x20 if more else 0))))
    return "".join(out)


def encode_rle(mask: np.ndarray) -> dict:
    """{"size": [h, w], "counts": compressed string}: a Detail/COCO segmentation."""
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle_string(mask_runs(mask))}


# --- archives ---------------------------------------------------------------------------------


def write_tar(path: Path, files: dict[str, bytes], gz: bool = False) -> Path:
    """A tar (gzip-compressed with `gz`) of `files` {member path: bytes}, with directory
    entries for every parent folder, as `tar cf` of a real tree writes."""
    folders = sorted({"/".join(name.split("/")[:i]) for name in files for i in range(1, name.count("/") + 1)})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for folder in folders:
            info = tarfile.TarInfo(folder + "/")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
            tar.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, FIXED_MTIME
            tar.addfile(info, io.BytesIO(files[name]))
    data = buf.getvalue()
    if gz:
        data = gzip.compress(data, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    """A zip of `files` with directory entries, stored (JPEGs and PNGs are compressed already)."""
    folders = sorted({"/".join(name.split("/")[:i]) for name in files for i in range(1, name.count("/") + 1)})
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for folder in folders:
            zf.writestr(zipfile.ZipInfo(folder + "/", date_time=(2017, 1, 1, 0, 0, 0)), b"")
        for name in sorted(files):
            zf.writestr(zipfile.ZipInfo(name, date_time=(2017, 1, 1, 0, 0, 0)), files[name])
    return path


# --- the three datasets -------------------------------------------------------------------------


@dataclass
class MirrorSpec:
    """How many images a miniature holds, and their size."""

    train: int = 4
    val: int = 1
    height: int = 64
    width: int = 80
    block: int = 4  # label cells; every class of the dataset gets a cell in every image


@dataclass
class DatasetMirror:
    """One dataset's miniature: its archives and what a converter must make of them."""

    name: str
    archives: dict[str, Path] = field(default_factory=dict)
    train_ids: list[str] = field(default_factory=list)
    val_ids: list[str] = field(default_factory=list)


COCO_KEPT_IDS = [i for i in range(182) if i not in COCO_STUFF_UNUSED_IDS]  # 171 stuffthingmap ids


def coco_ids(spec: MirrorSpec) -> dict[str, list[str]]:
    return {"train2017": [f"{9 + 16 * k:012d}" for k in range(spec.train)],
            "val2017": [f"{139 + 146 * k:012d}" for k in range(spec.val)]}


def build_coco_stuff(folder: Path, spec: MirrorSpec, overrides: dict[str, bytes] | None = None,
                     drop: Sequence[str] = ()) -> DatasetMirror:
    """COCO-Stuff 164K. Every image holds all 171 classes (stuffthingmap ids with unlabeled
    255 in the spare cells). `overrides` replaces archive members by path and `drop` leaves
    members out (bad-input tests)."""
    members: dict[str, dict[str, bytes]] = {"train2017.zip": {}, "val2017.zip": {},
                                            "stuffthingmaps_trainval2017.zip": {}}
    seed = 0
    for split, ids in coco_ids(spec).items():
        for image_id in ids:
            seed += 1
            members[f"{split}.zip"][f"{split}/{image_id}.jpg"] = jpeg_bytes(spec.height, spec.width, seed)
            label = block_label(spec.height, spec.width, spec.block, COCO_KEPT_IDS, 255, seed)
            members["stuffthingmaps_trainval2017.zip"][f"{split}/{image_id}.png"] = png_bytes(label)
    out = DatasetMirror("coco_stuff_164k", train_ids=coco_ids(spec)["train2017"],
                        val_ids=coco_ids(spec)["val2017"])
    for archive, files in members.items():
        files = _edit(files, overrides, drop)
        out.archives[archive] = write_zip(folder / archive, files)
    return out


def voc_lists(spec: MirrorSpec) -> dict[str, list[str]]:
    """VOC train/val and SBD train/val ids, overlapping as the real lists do: SBD holds some
    VOC train images, and one VOC val image (which must not reach the augmented train set)."""
    voc_train = [f"2007_{32 + k:06d}" for k in range(max(1, spec.train // 2))]
    voc_val = [f"2007_{500 + k:06d}" for k in range(spec.val)]
    extra = spec.train - len(voc_train)
    sbd_only = [f"2008_{2 + k:06d}" for k in range(extra)]
    return {
        "voc_train": voc_train,
        "voc_val": voc_val,
        "sbd_train": sbd_only[: (extra + 1) // 2] + voc_train[:1],
        "sbd_val": sbd_only[(extra + 1) // 2:] + voc_val[:1],
    }


def build_voc12(folder: Path, spec: MirrorSpec, overrides: dict[str, bytes] | None = None,
                drop: Sequence[str] = ()) -> DatasetMirror:
    """VOC 2012 + SBD aug. Labels hold background 0, all 20 classes and 255 boundaries;
    SBD .mat files hold 0..20 (no boundaries)."""
    lists = voc_lists(spec)
    voc, sbd = "VOCdevkit/VOC2012", "benchmark_RELEASE/dataset"
    tar_files: dict[str, bytes] = {}
    tgz_files: dict[str, bytes] = {}
    seed = 100
    every = sorted(set(lists["voc_train"] + lists["voc_val"] + lists["sbd_train"] + lists["sbd_val"]))
    for image_id in every:
        seed += 1
        jpg = jpeg_bytes(spec.height, spec.width, seed)
        tar_files[f"{voc}/JPEGImages/{image_id}.jpg"] = jpg
        label = block_label(spec.height, spec.width, spec.block, list(range(21)), 0, seed)
        if image_id in lists["voc_train"] + lists["voc_val"]:
            boundary = label.copy()
            boundary[:, ::spec.block] = 255  # VOC's void outlines
            tar_files[f"{voc}/SegmentationClass/{image_id}.png"] = png_bytes(boundary, palette=True)
        if image_id in lists["sbd_train"] + lists["sbd_val"]:
            tgz_files[f"{sbd}/img/{image_id}.jpg"] = jpg
            tgz_files[f"{sbd}/cls/{image_id}.mat"] = sbd_mat_bytes(label)
    sets = f"{voc}/ImageSets/Segmentation"
    tar_files[f"{sets}/train.txt"] = _lines(lists["voc_train"])
    tar_files[f"{sets}/val.txt"] = _lines(lists["voc_val"])
    tar_files[f"{sets}/trainval.txt"] = _lines(sorted(lists["voc_train"] + lists["voc_val"]))
    tgz_files[f"{sbd}/train.txt"] = _lines(lists["sbd_train"])
    tgz_files[f"{sbd}/val.txt"] = _lines(lists["sbd_val"])
    out = DatasetMirror("voc12")
    out.train_ids = sorted((set(lists["voc_train"]) | set(lists["sbd_train"]) | set(lists["sbd_val"]))
                           - set(lists["voc_val"]))
    out.val_ids = list(lists["voc_val"])
    out.archives["VOCtrainval_11-May-2012.tar"] = write_tar(
        folder / "VOCtrainval_11-May-2012.tar", _edit(tar_files, overrides, drop))
    out.archives["benchmark.tgz"] = write_tar(folder / "benchmark.tgz", _edit(tgz_files, overrides, drop),
                                              gz=True)
    return out


# Categories of the Detail API's 459-class scheme that are not among the 59 (Context-59 maps
# them to 255; Context-459 keeps them): id i + 1 names CONTEXT_459[i], as labels.txt.
CONTEXT_59_IDS = {cid for _, cid in CONTEXT_59_DETAIL_IDS}
CONTEXT_OTHER_CATEGORIES = tuple((i + 1, name) for i, name in enumerate(CONTEXT_459)
                                 if i + 1 not in CONTEXT_59_IDS)


def context_ids(spec: MirrorSpec) -> dict[str, list[str]]:
    return {"train": [f"2008_{2 + k:06d}" for k in range(spec.train)],
            "val": [f"2008_{200 + k:06d}" for k in range(spec.val)]}


def build_context59(folder: Path, spec: MirrorSpec, overrides: dict[str, bytes] | None = None,
                    drop: Sequence[str] = ()) -> DatasetMirror:
    """PASCAL Context 59 (Detail json). Per image one RLE annotation per Context-59 category, in
    cells of a block grid; unlabeled cells stay 0; a last annotation paints the image's first
    row again with another class (later annotations win). The json lists all 459 categories
    but, as the real one, annotates only the 59."""
    cat_ids = [cid for _, cid in CONTEXT_59_DETAIL_IDS]
    block = fitting_block(spec, len(cat_ids) + 1)
    tar_files: dict[str, bytes] = {}
    images, annos = [], []
    seed, ann_id = 300, 0
    for phase, ids in context_ids(spec).items():
        for image_id in ids:
            seed += 1
            jpg = jpeg_bytes(spec.height, spec.width, seed)
            tar_files[f"VOCdevkit/VOC2010/JPEGImages/{image_id}.jpg"] = jpg
            numeric = int(image_id.replace("_", ""))
            images.append({"image_id": numeric, "file_name": f"{image_id}.jpg", "height": spec.height,
                           "width": spec.width, "phase": phase, "date_captured": "03-May-2010"})
            cells = block_label(spec.height, spec.width, block, list(range(len(cat_ids))), 65535, seed,
                                dtype=np.uint16)
            painted = [(cat_ids[v], cells == v) for v in range(len(cat_ids))]
            top = np.zeros_like(cells, dtype=bool)
            top[0] = True
            painted.append((CONTEXT_59_DETAIL_IDS[seed % 59][1], top))
            for category_id, mask in painted:
                ann_id += 1
                ys, xs = np.nonzero(mask)
                annos.append({"id": ann_id, "image_id": numeric, "category_id": int(category_id),
                              "segmentation": encode_rle(mask), "area": int(mask.sum()),
                              "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                       int(ys.max() - ys.min() + 1)],
                              "iscrowd": 0, "parts": []})
    categories = [{"category_id": cid, "name": name, "supercategory": "object", "parts": []}
                  for name, cid in CONTEXT_59_DETAIL_IDS]
    categories += [{"category_id": cid, "name": name, "supercategory": "object", "parts": []}
                   for cid, name in CONTEXT_OTHER_CATEGORIES]
    detail = {"info": {"description": "PASCAL in Detail (miniature mirror)"}, "images": images,
              "annotations": [], "categories": sorted(categories, key=lambda c: c["category_id"]),
              "parts": [], "annos_segmentation": annos, "annos_joints": [], "annos_occlusion": [],
              "annos_boundary": []}
    json_files = {"trainval_merged.json": json.dumps(detail).encode()}
    json_files = _edit(json_files, overrides, drop)
    out = DatasetMirror("pascal_context_59", train_ids=context_ids(spec)["train"],
                        val_ids=context_ids(spec)["val"])
    out.archives["VOCtrainval_03-May-2010.tar"] = write_tar(
        folder / "VOCtrainval_03-May-2010.tar", _edit(tar_files, overrides, drop))
    path = folder / "trainval_merged.json"
    path.write_bytes(json_files["trainval_merged.json"])
    out.archives["trainval_merged.json"] = path
    return out


def build_context459(folder: Path, spec: MirrorSpec, overrides: dict[str, bytes] | None = None,
                     drop: Sequence[str] = ()) -> DatasetMirror:
    """PASCAL-Context's trainval.tar.gz for the Context miniature's images (spec: Context-59's):
    each LabelMap holds every class 1..459 in a cell of a block grid, 0 in the spare cells."""
    block = fitting_block(spec, len(CONTEXT_459) + 1)
    files: dict[str, bytes] = {}
    seed = 900
    for ids in context_ids(spec).values():
        for image_id in ids:
            seed += 1
            labelmap = block_label(spec.height, spec.width, block, list(range(1, len(CONTEXT_459) + 1)), 0,
                                   seed, dtype=np.uint16)
            files[f"trainval/{image_id}.mat"] = context_mat_bytes(labelmap)
    files["labels.txt"] = "".join(f"{i + 1}: {name}\n" for i, name in enumerate(CONTEXT_459)).encode()
    out = DatasetMirror("pascal_context_459", val_ids=context_ids(spec)["val"])
    out.archives["trainval.tar.gz"] = write_tar(folder / "trainval.tar.gz", _edit(files, overrides, drop),
                                                gz=True)
    return out


def ade_ids(spec: MirrorSpec, prefix: str = "ADE") -> dict[str, list[str]]:
    return {"training": [f"{prefix}_train_{k + 1:08d}" for k in range(spec.train)],
            "validation": [f"{prefix}_val_{k + 1:08d}" for k in range(spec.val)]}


def build_ade20k_150(folder: Path, spec: MirrorSpec, overrides: dict[str, bytes] | None = None,
                     drop: Sequence[str] = ()) -> DatasetMirror:
    """ADE20K-150 (SceneParsing). Annotation PNGs hold every value 1..150 and 0 (other)."""
    block = fitting_block(spec, len(ADE20K_150) + 1)
    files: dict[str, bytes] = {}
    scenes = []
    seed = 500
    for folder_name, ids in ade_ids(spec).items():
        for image_id in ids:
            seed += 1
            files[f"ADEChallengeData2016/images/{folder_name}/{image_id}.jpg"] = jpeg_bytes(
                spec.height, spec.width, seed)
            label = block_label(spec.height, spec.width, block, list(range(1, 151)), 0, seed)
            files[f"ADEChallengeData2016/annotations/{folder_name}/{image_id}.png"] = png_bytes(label)
            scenes.append(f"{image_id} street\n")
    files["ADEChallengeData2016/sceneCategories.txt"] = "".join(scenes).encode()
    files["ADEChallengeData2016/objectInfo150.txt"] = (
        "Idx\tRatio\tTrain\tVal\tName\n"
        + "".join(f"{i + 1}\t0.01\t1\t1\t{n}\n" for i, n in enumerate(ADE20K_150))
    ).encode()
    ids = ade_ids(spec)
    out = DatasetMirror("ade20k_150", train_ids=ids["training"], val_ids=ids["validation"])
    out.archives["ADEChallengeData2016.zip"] = write_zip(folder / "ADEChallengeData2016.zip",
                                                         _edit(files, overrides, drop))
    return out


# Object class indices of ADE20K full that are not among the 847: the converter ignores them.
ADE_UNLISTED_INDICES = (1, 3, 3157)
ADE_LARGE = (520, 650)  # (h, w) of the first validation image: shrunk to 512 x 640 on conversion


def ade_seg_png(index: np.ndarray, seed: int) -> bytes:
    """An ADE20K full `_seg.png`: R = index / 256 * 10 (+ 0..9, which R / 10 drops), G =
    index % 256, B = an instance number."""
    rng = np.random.default_rng(seed)
    rgb = np.stack([(index // 256) * 10 + rng.integers(0, 10, index.shape), index % 256,
                    rng.integers(0, 256, index.shape)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def build_ade20k_847(folder: Path, spec: MirrorSpec, overrides: dict[str, bytes] | None = None,
                     drop: Sequence[str] = ()) -> DatasetMirror:
    """ADE20K-847 (ADE20K_2021_17_01). Validation images hold every one of the 847 indices
    and a few unlisted ones; training images (which the converter skips) sit beside them.
    The first validation image is ADE_LARGE (a short side above 512, which the converter
    shrinks to 512 as MaskFormer's does), in cells of 16 px that survive the shrinking."""
    import pickle

    indices = [i for i, _ in ADE20K_847_IDS] + list(ADE_UNLISTED_INDICES)
    top = "ADE20K_2021_17_01"
    files: dict[str, bytes] = {}
    index = {"filename": [], "folder": []}
    seed = 700
    for split, ids in ade_ids(spec).items():
        for k, image_id in enumerate(ids):
            seed += 1
            scene = f"{top}/images/ADE/{split}/urban/{'street' if k % 2 else 'alley'}"
            h, w = ADE_LARGE if (split, k) == ("validation", 0) else (spec.height, spec.width)
            block = 16 if (h, w) == ADE_LARGE else fitting_block(spec, len(indices) + 1)
            files[f"{scene}/{image_id}.jpg"] = jpeg_bytes(h, w, seed)
            cls = block_label(h, w, block, indices, 0, seed, dtype=np.uint16)
            cls = cls.astype(np.int64)
            files[f"{scene}/{image_id}_seg.png"] = ade_seg_png(cls, seed)
            files[f"{scene}/{image_id}.json"] = json.dumps(
                {"annotation": {"filename": f"{image_id}.jpg"}}).encode()
            index["filename"].append(f"{image_id}.jpg")
            index["folder"].append(scene)
    files[f"{top}/index_ade20k.pkl"] = pickle.dumps(index, protocol=4)
    files[f"{top}/objects.txt"] = "".join(f"{i}\t{n}\n" for i, n in ADE20K_847_IDS).encode()
    ids = ade_ids(spec)
    out = DatasetMirror("ade20k_847", val_ids=ids["validation"])
    out.archives["ADE20K_2021_17_01.zip"] = write_zip(folder / "ADE20K_2021_17_01.zip",
                                                      _edit(files, overrides, drop))
    return out


BUILDERS = {"coco_stuff_164k": build_coco_stuff, "voc12": build_voc12, "pascal_context_59": build_context59,
            "pascal_context_459": build_context459, "ade20k_150": build_ade20k_150,
            "ade20k_847": build_ade20k_847}
# Targets converted from another dataset's files: their mirror is that one's.
DERIVED = dict(DOWNLOAD_OF)
# Mirrors of the same images: Context-459's label maps are for Context-59's miniature.
SAME_IMAGES = {"pascal_context_459": "pascal_context_59"}


def _lines(ids: Sequence[str]) -> bytes:
    return "".join(f"{i}\n" for i in ids).encode()


def _edit(files: dict[str, bytes], overrides: dict[str, bytes] | None,
          drop: Sequence[str]) -> dict[str, bytes]:
    files = dict(files)
    for name, data in (overrides or {}).items():
        if name in files:
            files[name] = data
    for name in drop:
        files.pop(name, None)
    return files


# --- sources file and the whole mirror ----------------------------------------------------------


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_sources(path: Path, mirrors: dict[str, DatasetMirror], url: str) -> Path:
    """A sources YAML in the packaged layout: every packaged entry, its URL replaced by the
    mirror's and its digests by the mirror file's sha256. A mirror lacking a file the
    packaged sources list is an error: the miniature must have the real file names."""
    packaged = load_sources()
    out = {}
    for dataset, mirror in mirrors.items():
        if dataset in DERIVED:
            continue
        files = []
        for entry in packaged[dataset]:
            name = entry["name"]
            if name not in mirror.archives:
                raise ValueError(f"the {dataset} mirror lacks {name}, which sources.yaml lists")
            where = ({"registration": entry["registration"]} if entry.get("registration")
                     else {"url": f"{url.rstrip('/')}/{name}"})
            files.append({"name": name, **where, "md5": None, "sha1": None,
                          "sha256": sha256_file(mirror.archives[name]),
                          "extract_to": entry.get("extract_to")})
        out[dataset] = {"files": files}
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    return path


def write_mirror(folder: Path, specs: dict[str, MirrorSpec] | None = None) -> dict[str, DatasetMirror]:
    """All three miniatures in `folder`, side by side as on a mirror (the file names are
    distinct across datasets, and `download --base-url` fetches `<base_url>/<name>`)."""
    specs = specs or {}
    built = {name: build(folder, specs.get(SAME_IMAGES.get(name, name), MirrorSpec()))
             for name, build in BUILDERS.items()}
    for name, source in DERIVED.items():
        base = built[source]
        built[name] = DatasetMirror(name, dict(base.archives), list(base.train_ids), list(base.val_ids))
    return built


def local_files(mirrors: dict[str, DatasetMirror]) -> list[str]:
    """`download --local` arguments for the mirror's files that need a registration."""
    registered = {e["name"] for files in load_sources().values() for e in files if e.get("registration")}
    return [f"{name}={path}" for m in mirrors.values() for name, path in m.archives.items()
            if name in registered]


# --- a local HTTP server ------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    timeout = 5  # a stuck client cannot hold a server thread for long

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        srv = self.server
        rng = self.headers.get("Range")
        srv.log.append((self.path, rng))
        data = srv.lookup(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not srv.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in srv.drop_once:  # promise everything, send half, hang up
            srv.drop_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def lookup(self, url_path: str) -> bytes | None:
        if url_path in self.files:
            return self.files[url_path]
        if self.root is None:
            return None
        rel = url_path.split("?", 1)[0].lstrip("/")
        path = (self.root / rel).resolve()
        if self.root not in path.parents or not path.is_file():
            return None
        return path.read_bytes()


@contextmanager
def http_mirror(root: Path | None = None) -> Iterator[_Server]:
    """A threaded HTTP server on 127.0.0.1 (a free port) serving `root`'s files and the
    `files` dict ({"/name": bytes}) it exposes; `drop_once` (paths whose next response is cut
    half-way), `ignore_range` and `log` ((path, Range header) per request) shape and record
    the traffic. Yields the server; its `url` is http://127.0.0.1:<port>."""
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.root = None if root is None else Path(root).resolve()
    srv.files, srv.drop_once, srv.log, srv.ignore_range = {}, set(), [], False
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


# --- CLIP weights -------------------------------------------------------------------------------


def random_clip_weights(path: Path, model: str = "ViT-B-16-quickgelu", model_config: dict | None = None,
                        seed: int = 0) -> Path:
    """Save a seeded random open_clip CLIP's state dict to `path`: the named model, or the
    one `model_config` describes. Loaded through `clip.pretrained: <path>` like real weights."""
    import open_clip
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_config is None:
            net = open_clip.create_model(model, pretrained=None)
        else:
            net = open_clip.CLIP(**model_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    return path
