"""Writing one feature shard: plan, allocate, fill batch by batch with crash-safe `done`
flags, resume after a kill, verify every row, rename into place (the decisions are in
cascade_clip.cache)."""

from __future__ import annotations

import datetime
import errno
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import cascade_clip
from cascade_clip.cache.encoding import check_rows, encode, row_checksum, stored_dtype
from cascade_clip.cache.provenance import (
    GLOBAL_CHUNK_ROWS,
    PARTIAL_SUFFIX,
    SHARD_KIND,
    VIEW_BYTES,
    CacheError,
    CacheMismatchError,
    check_provenance,
    open_h5,
    provenance,
    read_attrs,
)
from cascade_clip.classes import config_unseen_names
from cascade_clip.config import Config
from cascade_clip.errors import InputError

# --- shards ---------------------------------------------------------------------------------


def parse_shard(spec: str) -> tuple[int, int]:
    """"I/N" (0-based I) -> (I, N)."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InputError(f"shard {spec!r} is not of the form I/N (e.g. 0/4)") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"shard {spec!r}: need 0 <= I < N")
    return i, n


def shard_range(num_images: int, index: int, count: int) -> range:
    """Contiguous image indices of shard `index` of `count` (sizes differ by at most 1)."""
    return range(index * num_images // count, (index + 1) * num_images // count)


def partial_path(out: str | Path) -> Path:
    return Path(str(out) + PARTIAL_SUFFIX)



def _dcpl(chunks: tuple[int, ...] | None) -> h5py.h5p.PropDCID:
    """Dataset creation properties: space allocated at creation, no fill values written."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    if chunks is not None:
        dcpl.set_chunk(chunks)
    return dcpl


def _create(
    f: h5py.File,
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    chunks: tuple[int, ...] | None = None,
    compression: str | None = None,
) -> h5py.Dataset:
    if shape[0] == 0:  # an empty shard (more shards than images): nothing to chunk
        return f.create_dataset(name, shape=shape, dtype=dtype)
    if compression is None:
        return f.create_dataset(name, shape=shape, dtype=dtype, dcpl=_dcpl(chunks))
    # Filtered chunks cannot be written in place; let HDF5 allocate them as they come.
    return f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, compression=compression)


@dataclass
class ShardPlan:
    """What one shard holds: image indices [image_start, image_stop) x V views."""

    index: int
    count: int
    image_start: int
    image_stop: int
    views: int

    @property
    def num_rows(self) -> int:
        return (self.image_stop - self.image_start) * self.views

    def row(self, r: int) -> tuple[int, int]:
        """Local row -> (image index in the split, view index)."""
        return self.image_start + r // self.views, r % self.views


def _create_shard(
    path: Path,
    plan: ShardPlan,
    prov: dict[str, Any],
    ids: Sequence[str],
    shapes: dict[str, int],
    compression: str | None,
    encoding: str,
) -> None:
    """Create `path` with every dataset allocated and the static per-row metadata written."""
    m, k = plan.num_rows, shapes["num_classes"]
    l_, n, c = shapes["num_taps"], shapes["num_tokens"], shapes["embed_dim"]
    id_bytes = max(1, max((len(i.encode()) for i in ids), default=1))
    with open_h5(path, "w") as f:
        for key, value in prov.items():
            f.attrs[key] = value
        f.attrs.update(
            kind=SHARD_KIND,
            code_version=cascade_clip.__version__,
            grid=list(shapes["grid"]),
            embed_dim=c,
            num_classes=k,
            shard_index=plan.index,
            shard_count=plan.count,
            image_start=plan.image_start,
            image_stop=plan.image_stop,
            num_rows=m,
            shard_uid=uuid.uuid4().hex,
            complete=False,
            verified_rows=0,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        _create(f, "taps", (m, l_, n, c), stored_dtype(encoding), (1, l_, n, c), compression)
        _create(f, "global_token", (m, c), np.float16, (min(max(m, 1), GLOBAL_CHUNK_ROWS), c))
        _create(f, "checksum", (m,), np.uint32)
        _create(f, "view", (m,), f"S{VIEW_BYTES}")
        _create(f, "present", (m, k), np.uint8)
        f.create_dataset("done", data=np.zeros(m, np.uint8), dcpl=_dcpl(None))
        rows = [plan.row(r) for r in range(m)]
        f.create_dataset("image_index", data=np.array([i for i, _ in rows], dtype=np.int64).reshape(m))
        f.create_dataset("view_index", data=np.array([v for _, v in rows], dtype=np.int16).reshape(m))
        f.create_dataset("ids", data=np.array([ids[i].encode() for i, _ in rows], dtype=f"S{id_bytes}"))


def done_prefix(f: h5py.File) -> int:
    """Rows [0, result) are complete: the leading run of set `done` flags."""
    done = f["done"][:]
    unset = np.flatnonzero(done == 0)
    return int(unset[0]) if unset.size else int(done.size)


def _write_rows(f: h5py.File, start: int, rows: dict[str, np.ndarray]) -> None:
    """Write one batch of rows [start, start + b) and flush (raw data only: no metadata)."""
    stop = start + len(rows["taps"])
    for name, value in rows.items():
        f[name][start:stop] = value
    f.flush()


def _mark_done(f: h5py.File, start: int, stop: int) -> None:
    f["done"][start:stop] = 1
    f.flush()


class _ShardViews(Dataset):
    """Rows of a shard as encoder inputs: image view tensor + view JSON + class presence."""

    def __init__(self, cfg: Config, split: str, plan: ShardPlan, rows: range):
        from cascade_clip.data.dataset import SegmentationDataset

        self.cfg, self.plan, self.rows = cfg, plan, rows
        # Inductive mode: the label the cat_max_ratio test sees has unseen classes at 255.
        self.data = SegmentationDataset(
            cfg.dataset.root, split, unseen=config_unseen_names(cfg), mode="inductive"
        )
        self._last: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._last is None or self._last[0] != index:
            self._last = (index, self.data.load_raw(index))
        return self._last[1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        from cascade_clip.data.transforms import apply_view_to_image, sample_rng, sample_view

        row = self.rows[i]
        index, view_index = self.plan.row(row)
        image, label = self._raw(index)
        rng = sample_rng(self.cfg.seed, view_index, index)
        view = sample_view(rng, image.shape[:2], self.data.lut[label], self.cfg.train.augment)
        view_json = json.dumps(view.to_dict(), separators=(",", ":")).encode()
        if len(view_json) > VIEW_BYTES:
            image_id = self.data.ids[index]
            raise CacheError(f"view of image {image_id} needs {len(view_json)} > {VIEW_BYTES} bytes")
        present = np.zeros(self.data.num_classes, np.uint8)
        present[[v for v in np.unique(label) if v < self.data.num_classes]] = 1
        return {
            "row": row,
            "image": apply_view_to_image(image, view),
            "view": np.frombuffer(view_json.ljust(VIEW_BYTES, b"\0"), dtype=f"S{VIEW_BYTES}")[0],
            "present": torch.from_numpy(present),
        }


def _collate_rows(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "row": [it["row"] for it in items],
        "image": torch.stack([it["image"] for it in items]),
        "view": np.array([it["view"] for it in items], dtype=f"S{VIEW_BYTES}"),
        "present": torch.stack([it["present"] for it in items]).numpy(),
    }


def build_model(cfg: Config, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The frozen CascadeCLIP of `cfg` (its encoder writes the cache), in eval mode on `device`."""
    from cascade_clip.model import CascadeCLIP, load_clip

    clip, _ = load_clip(cfg.clip)
    return CascadeCLIP(clip, cfg.model).eval().to(device)


def _check_writable_config(cfg: Config, split: str) -> None:
    if cfg.model.encoder_mode != "frozen":
        raise InputError(
            f"model.encoder_mode is {cfg.model.encoder_mode!r}: the encoder trains (prompts), so its "
            "features cannot be cached; the cache is for encoder_mode: frozen"
        )
    if split != cfg.dataset.train_split:
        raise InputError(
            f"split {split!r} is not cached: only the training split ({cfg.dataset.train_split!r}) is. "
            "Validation is evaluated online with sliding windows (see cascade_clip.cache)"
        )
    if cfg.train.augment.crop_size != cfg.clip.image_size:
        raise InputError(
            f"train.augment.crop_size {cfg.train.augment.crop_size} differs from clip.image_size "
            f"{cfg.clip.image_size}: the encoder input is the crop"
        )


def _shapes(model: torch.nn.Module, cfg: Config, num_classes: int) -> dict[str, Any]:
    enc = model.encoder
    side = cfg.train.augment.crop_size // enc.patch_size
    return {
        "num_taps": len(enc.blocks),
        "grid": (side, side),
        "num_tokens": side * side,
        "embed_dim": int(enc.embed_dim),
        "num_classes": num_classes,
    }


def _existing_complete(out: Path, prov: dict[str, Any], plan: ShardPlan) -> bool:
    """True when `out` is a complete shard of this very config and plan (nothing to do)."""
    with open_h5(out) as f:
        attrs = read_attrs(f)
        check_provenance(attrs, prov, out)
        for key, want in (("shard_index", plan.index), ("shard_count", plan.count)):
            if attrs.get(key) != want:
                raise CacheMismatchError(out, key, attrs.get(key), want)
        return bool(attrs.get("complete")) and done_prefix(f) == plan.num_rows


def _resumable(partial: Path, prov: dict[str, Any], plan: ShardPlan, log: Callable[[str], None]) -> bool:
    """Can `partial` be resumed? A stale or unreadable one is deleted (it was never verified)."""
    if not partial.exists():
        return False
    try:
        with open_h5(partial) as f:
            attrs = read_attrs(f)
            check_provenance(attrs, prov, partial)
            if (attrs.get("shard_index"), attrs.get("shard_count")) != (plan.index, plan.count):
                raise CacheError(f"{partial}: written for another shard")
            if attrs.get("num_rows") != plan.num_rows or f["taps"].shape[0] != plan.num_rows:
                raise CacheError(f"{partial}: row count differs")
            return True
    except (CacheError, KeyError, OSError) as err:
        log(f"discarding {partial}: {err}")
        partial.unlink()
        return False


def write_shard(
    cfg: Config,
    split: str,
    shard: tuple[int, int],
    out: str | Path,
    *,
    model: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Encode shard `shard` = (I, N) of `split`'s views into the HDF5 file `out`.

    Args:
        model: a frozen CascadeCLIP whose `.encode` gives the taps; built from `cfg` if None.
        workers: DataLoader worker processes decoding and augmenting images.
        overwrite: replace an existing complete `out` made with another config.
    Returns `out`. Resumes `<out>.partial` if a previous run stopped; raises CacheError on a
    failed write (disk full: the partial is kept for resuming).
    """
    from cascade_clip.data.dataset import SegmentationDataset

    _check_writable_config(cfg, split)
    out = Path(out)
    data = SegmentationDataset(cfg.dataset.root, split, unseen=config_unseen_names(cfg), mode="inductive")
    prov = provenance(cfg, split, data.ids)
    lo = shard_range(len(data.ids), *shard)
    plan = ShardPlan(shard[0], shard[1], lo.start, lo.stop, int(cfg.cache.views_per_image))
    if out.exists() and not overwrite:
        try:
            complete = _existing_complete(out, prov, plan)
        except CacheMismatchError as err:
            raise CacheMismatchError(out, err.field, err.cached, err.wanted,
                                     "it is kept; pass --overwrite to replace it") from None
        if complete:
            log(f"{out}: already complete ({plan.num_rows} rows), nothing to do")
            return out
        raise CacheError(f"{out}: exists but is incomplete; remove it or pass --overwrite")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model is None:
        model = build_model(cfg, device)
    device = next(model.parameters()).device
    partial = partial_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not _resumable(partial, prov, plan, log):
        try:
            _create_shard(partial, plan, prov, data.ids, _shapes(model, cfg, data.num_classes),
                          cfg.cache.compression, cfg.cache.encoding)
        except OSError as err:
            raise _write_error(partial, 0, plan.num_rows, err) from None
    _fill_shard(partial, cfg, split, plan, model, device, workers, progress, log)
    _verify_partial(partial, plan, progress)
    _finish(partial, out, plan)
    log(f"{out}: {plan.num_rows} rows (images {plan.image_start}..{plan.image_stop - 1}, "
        f"{plan.views} view(s) each)")
    return out


def _write_error(partial: Path, done: int, total: int, err: BaseException) -> CacheError:
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
    what = "disk full" if full else f"write failed ({err})"
    return CacheError(
        f"{partial}: {what} after {done}/{total} rows; the partial file is kept, "
        "free space and rerun to resume"
    )


def _fill_shard(
    partial: Path,
    cfg: Config,
    split: str,
    plan: ShardPlan,
    model: torch.nn.Module,
    device: torch.device,
    workers: int,
    progress: bool,
    log: Callable[[str], None],
) -> None:
    """Encode and write rows after the `done` prefix of `partial`, batch by batch."""
    from tqdm import tqdm

    with open_h5(partial) as f:
        start = done_prefix(f)
    if start:
        log(f"{partial}: resuming after {start}/{plan.num_rows} rows")
    loader = DataLoader(
        _ShardViews(cfg, split, plan, range(start, plan.num_rows)),
        batch_size=cfg.cache.batch_size,
        num_workers=workers,
        collate_fn=_collate_rows,
    )
    batches = iter(loader)  # workers fork here, before the file is opened for writing
    bar = tqdm(total=plan.num_rows, initial=start, unit="view", disable=not progress, desc=partial.name)
    done = start
    with open_h5(partial, "r+") as f:
        for batch in batches:
            with torch.inference_mode():
                feats = model.encode(batch["image"].to(device))
                finite = bool(torch.isfinite(feats.taps).all() and torch.isfinite(feats.global_token).all())
                taps = encode(feats.taps.transpose(0, 1), cfg.cache.encoding).cpu().numpy()  # (B, L, N, C)
                glob = feats.global_token.to(torch.float16).cpu().numpy()
            first, stop = batch["row"][0], batch["row"][-1] + 1
            if first != done:
                raise CacheError(f"{partial}: rows out of order (got {first}, expected {done})")
            if not finite:
                rows = f"{first}..{stop - 1}"
                raise CacheError(f"{partial}: the encoder gave non-finite features in rows {rows}")
            sums = np.array([row_checksum(t, g) for t, g in zip(taps, glob)], np.uint32)
            try:
                _write_rows(f, first, {"taps": taps, "global_token": glob, "checksum": sums,
                                       "view": batch["view"], "present": batch["present"]})
                _mark_done(f, first, stop)
            except OSError as err:
                raise _write_error(partial, done, plan.num_rows, err) from None
            done = stop
            bar.update(stop - first)
    bar.close()


def _verify_partial(partial: Path, plan: ShardPlan, progress: bool) -> None:
    """Read back and check every row of the filled `partial` (`encoding.check_rows`) before it
    becomes the shard. A kill here keeps the partial: the rerun writes nothing, checks again."""
    from tqdm import tqdm

    with open_h5(partial) as f:
        if done_prefix(f) != plan.num_rows:
            raise CacheError(f"{partial}: {done_prefix(f)}/{plan.num_rows} rows written")
        with tqdm(total=plan.num_rows, unit="view", disable=not progress, desc="verify") as bar:
            check_rows(f, partial, range(plan.num_rows), bar.update)


def _finish(partial: Path, out: Path, plan: ShardPlan) -> None:
    """Mark the verified `partial` complete and rename it onto `out`."""
    try:
        with open_h5(partial, "r+") as f:
            f.attrs["complete"] = True
            f.attrs["verified_rows"] = plan.num_rows
            f.flush()
    except OSError as err:
        raise _write_error(partial, plan.num_rows, plan.num_rows, err) from None
    os.replace(partial, out)


