"""A cache as readers see it (one shard or an index over shards), joining shards into an
index, and verifying a cache's files and rows."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import cascade_clip
from cascade_clip.cache.encoding import check_rows, stored_dtype
from cascade_clip.cache.provenance import (
    CACHE_FORMAT_VERSION,
    INDEX_KIND,
    PROVENANCE_FIELDS,
    SHARD_KIND,
    CacheError,
    CacheMismatchError,
    attr_value,
    check_provenance,
    open_h5,
    provenance,
    read_attrs,
)
from cascade_clip.cache.write import done_prefix, partial_path
from cascade_clip.classes import config_unseen_names
from cascade_clip.config import Config
from cascade_clip.errors import InputError, MissingInputError

# --- reading the layout of a shard or index ----------------------------------------------------


@dataclass
class CacheLayout:
    """A cache as readers see it: attributes, its shard files and per-row metadata."""

    path: Path
    attrs: dict[str, Any]
    shard_files: list[Path]
    shard_uids: list[str]
    offsets: np.ndarray  # (S + 1,) first row of each shard, then the total
    image_index: np.ndarray  # (M,) int64
    view_index: np.ndarray  # (M,) int16
    ids: list[str]
    views: np.ndarray  # (M,) S512 JSON
    present: np.ndarray  # (M, K) uint8

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def blocks(self) -> list[int]:
        return [int(b) for b in self.attrs["tapped_blocks"]]

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.attrs["grid"]
        return int(h), int(w)

    def locate(self, row: int) -> tuple[int, int]:
        """Global row -> (shard number, row within that shard)."""
        s = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return s, row - int(self.offsets[s])


def _read_rows_meta(f: h5py.File, path: Path) -> dict[str, Any]:
    try:
        return {
            "image_index": f["image_index"][:],
            "view_index": f["view_index"][:],
            "ids": [b.decode() for b in f["ids"][:]],
            "views": f["view"][:],
            "present": f["present"][:],
        }
    except KeyError as err:
        raise CacheError(f"{path}: missing dataset {err} (not a cascade-clip cache?)") from None
    except OSError as err:
        raise CacheError(f"{path}: unreadable metadata, truncated or corrupt ({err})") from None


def _check_shard_file(f: h5py.File, path: Path) -> dict[str, Any]:
    """A shard's attributes, after checking it is a complete shard."""
    attrs = read_attrs(f)
    if attrs.get("kind") != SHARD_KIND:
        raise CacheError(f"{path}: not a cascade-clip feature shard (kind={attrs.get('kind')!r})")
    if attrs.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheMismatchError(path, "format_version", attrs.get("format_version"), CACHE_FORMAT_VERSION)
    if not attrs.get("complete"):
        raise CacheError(f"{path}: shard is incomplete (rerun cache-features to resume it)")
    if attrs.get("verified_rows") != attrs.get("num_rows"):
        verified, rows = attrs.get("verified_rows"), attrs.get("num_rows")
        raise CacheError(f"{path}: {verified} of {rows} rows were verified when the shard was written; "
                         "write it again")
    return attrs


def open_layout(path: str | Path) -> CacheLayout:
    """Read a joined index, or a single complete shard, into a CacheLayout.

    Every shard an index lists must exist and carry the uid the index recorded.
    """
    path = Path(path)
    with open_h5(path) as f:
        kind = attr_value(f.attrs.get("kind"))
        if kind == SHARD_KIND:
            attrs = _check_shard_file(f, path)
            meta = _read_rows_meta(f, path)
            return CacheLayout(path, attrs, [path], [attrs["shard_uid"]],
                               np.array([0, attrs["num_rows"]]), **meta)
        if kind != INDEX_KIND:
            raise CacheError(f"{path}: not a cascade-clip feature cache (kind={kind!r})")
        attrs = read_attrs(f)
        meta = _read_rows_meta(f, path)
        try:
            files = [path.parent / p.decode() for p in f["shard_files"][:]]
            uids = [u.decode() for u in f["shard_uids"][:]]
            rows = f["shard_rows"][:]
        except KeyError as err:
            raise CacheError(f"{path}: index lacks {err}") from None
    for i, (shard, uid) in enumerate(zip(files, uids)):
        if not shard.is_file():
            raise CacheError(f"{path}: shard {i}/{len(files)} {shard} is missing")
        with open_h5(shard) as sf:
            got = attr_value(sf.attrs.get("shard_uid"))
        if got != uid:
            raise CacheError(f"{path}: shard {shard} was rewritten after the join (uid differs); rejoin")
    return CacheLayout(path, attrs, files, uids, np.concatenate([[0], np.cumsum(rows)]), **meta)


# --- join -------------------------------------------------------------------------------------

_SHARD_ONLY_ATTRS = ("shard_index", "image_start", "image_stop", "num_rows", "shard_uid", "complete",
                     "verified_rows", "created", "code_version")


def join_shards(inputs: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> Path:
    """Write a small index `out` over the complete shard files `inputs` (any order).

    All shards must share their provenance, and shards 0..N-1 must all be present.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CacheError(f"{out}: exists; remove it or pass --overwrite to rejoin")
    shards: dict[int, tuple[Path, dict[str, Any], dict[str, Any]]] = {}
    first: tuple[Path, dict[str, Any]] | None = None
    for p in map(Path, inputs):
        if not p.is_file():
            extra = " (a .partial exists: the shard did not finish)" if partial_path(p).exists() else ""
            raise MissingInputError(f"{p}: shard file not found{extra}")
        with open_h5(p) as f:
            attrs = _check_shard_file(f, p)
            if done_prefix(f) != attrs["num_rows"]:
                raise CacheError(f"{p}: marked complete but not every row is written")
            meta = _read_rows_meta(f, p)
        if first is None:
            first = (p, attrs)
        else:
            for key in (*PROVENANCE_FIELDS, "shard_count", "grid", "embed_dim", "num_classes"):
                if attr_value(attrs.get(key)) != attr_value(first[1].get(key)):
                    raise CacheMismatchError(p, key, attrs.get(key), first[1].get(key),
                                             f"differs from shard {first[0]}")
        if attrs["shard_index"] in shards:
            other = shards[attrs["shard_index"]][0]
            raise CacheError(f"{p}: shard {attrs['shard_index']} given twice (also {other})")
        shards[attrs["shard_index"]] = (p, attrs, meta)
    if first is None:
        raise InputError("cache-join: no shard files given")
    count = int(first[1]["shard_count"])
    missing = [i for i in range(count) if i not in shards]
    if missing:
        raise CacheError(f"{out}: shard(s) {missing} of {count} missing from the inputs; "
                         f"given {[str(shards[i][0]) for i in sorted(shards)]}")
    ordered = [shards[i] for i in range(count)]
    expect_start = 0
    for p, attrs, _ in ordered:
        if attrs["image_start"] != expect_start:
            raise CacheError(f"{p}: covers images from {attrs['image_start']}, expected {expect_start}")
        expect_start = attrs["image_stop"]
    if expect_start != first[1]["num_images"]:
        raise CacheError(f"{out}: shards cover {expect_start} of {first[1]['num_images']} images")
    _write_index(out, ordered, first[1])
    return out


def _write_index(out: Path, ordered: list, attrs: dict[str, Any]) -> None:
    tmp = partial_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rel = [os.path.relpath(p.resolve(), out.parent.resolve()) for p, _, _ in ordered]
    cat = {k: np.concatenate([m[k] for _, _, m in ordered]) for k in ("image_index", "view_index", "views",
                                                                      "present")}
    ids = [i for _, _, m in ordered for i in m["ids"]]
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in attrs.items():
                if key not in _SHARD_ONLY_ATTRS:
                    f.attrs[key] = value
            f.attrs.update(kind=INDEX_KIND, code_version=cascade_clip.__version__,
                           num_rows=int(sum(a["num_rows"] for _, a, _ in ordered)))
            f.create_dataset("shard_files", data=np.array([r.encode() for r in rel]))
            f.create_dataset("shard_uids", data=np.array([a["shard_uid"].encode() for _, a, _ in ordered]))
            f.create_dataset("shard_rows", data=np.array([a["num_rows"] for _, a, _ in ordered], np.int64))
            f.create_dataset("image_index", data=cat["image_index"])
            f.create_dataset("view_index", data=cat["view_index"])
            f.create_dataset("view", data=cat["views"])
            f.create_dataset("present", data=cat["present"])
            f.create_dataset("ids", data=np.array([i.encode() for i in ids]))
    except OSError as err:
        raise CacheError(f"{tmp}: cannot write the index ({err})") from None
    os.replace(tmp, out)


# --- verify -----------------------------------------------------------------------------------


def verify_cache(
    path: str | Path,
    cfg: Config,
    split: str | None = None,
    sample: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Check a cache (index or shard) against `cfg`; raise CacheError on the first problem.

    Checks attributes (provenance), row counts (every image of the split V times, for an
    index), the image ids, shapes and dtypes of every shard's datasets, `done` flags and that
    each shard was verified in full when written; then the stored rows (`encoding.check_rows`:
    checksum, finite unit-norm fp16 or well-formed int8 tokens): every row, or `sample`
    evenly spaced rows (what the workflow's join does: the shards' own jobs checked every
    row). Returns a summary dict.
    """
    from tqdm import tqdm

    from cascade_clip.data.dataset import SegmentationDataset

    path = Path(path)
    split = split or cfg.dataset.train_split
    layout = open_layout(path)
    ids = SegmentationDataset(cfg.dataset.root, split, unseen=config_unseen_names(cfg), mode="eval").ids
    check_provenance(layout.attrs, provenance(cfg, split, ids), path)
    views = int(layout.attrs["views_per_image"])
    if attr_value(layout.attrs["kind"]) == INDEX_KIND:
        counts = np.bincount(layout.image_index, minlength=len(ids))
        if layout.num_rows != len(ids) * views or len(counts) != len(ids) or (counts != views).any():
            raise CacheError(f"{path}: {layout.num_rows} rows, expected {len(ids)} images x {views} views")
    if [ids[i] for i in layout.image_index] != layout.ids:
        raise CacheError(f"{path}: stored image ids do not match the split list")
    l_, (h, w), c = len(layout.blocks), layout.grid, int(layout.attrs["embed_dim"])
    encoding = attr_value(layout.attrs["encoding"])
    rows_to_check = _rows_to_check(layout.num_rows, sample)
    bar = tqdm(total=len(rows_to_check), unit="row", disable=not progress, desc="verify")
    worst = 0.0
    for s, shard in enumerate(layout.shard_files):
        lo, hi = int(layout.offsets[s]), int(layout.offsets[s + 1])
        with open_h5(shard) as f:
            _check_shard_file(f, shard)
            _check_dataset(f, shard, "taps", (hi - lo, l_, h * w, c), stored_dtype(encoding))
            _check_dataset(f, shard, "global_token", (hi - lo, c), np.float16)
            _check_dataset(f, shard, "checksum", (hi - lo,), np.uint32)
            if done_prefix(f) != hi - lo:
                raise CacheError(f"{shard}: only {done_prefix(f)}/{hi - lo} rows written")
            mine = [r - lo for r in rows_to_check if lo <= r < hi]
            worst = max(worst, check_rows(f, shard, mine, bar.update))
    bar.close()
    return {"path": str(path), "rows": layout.num_rows, "shards": len(layout.shard_files),
            "views_per_image": views, "taps": layout.blocks, "grid": [h, w], "embed_dim": c,
            "encoding": encoding, "rows_checked": len(rows_to_check), "max_norm_error": worst}


def _rows_to_check(total: int, sample: int | None) -> list[int]:
    if sample is None or sample >= total:
        return list(range(total))
    return sorted({int(r) for r in np.linspace(0, total - 1, max(1, sample))})


def _check_dataset(f: h5py.File, path: Path, name: str, shape: tuple[int, ...], dtype: Any) -> None:
    if name not in f:
        raise CacheError(f"{path}: dataset '{name}' missing")
    d = f[name]
    if d.shape != shape or d.dtype != dtype:
        raise CacheError(f"{path}: '{name}' is {d.shape} {d.dtype}, expected {shape} {np.dtype(dtype)}")


# --- reader -----------------------------------------------------------------------------------

