"""HDF5 cache of the frozen encoder's tapped features (docs/design.md: Feature cache).

In `frozen` encoder mode the encoder never changes, so its tapped features are computed
once per training view and the decoders train from disk.

Decisions
---------
- **Rows are (image, view) pairs.** `cache.views_per_image` = V augmented views per
  training image; view `v` of image `i` (index in `splits/<split>.txt`) is drawn with
  `sample_rng(cfg.seed, v, i)`, the generator the online loader uses for epoch `v`, so the
  cached view `v` is exactly the view an online run with the same seed draws at epoch `v`.
  Views are sampled as the inductive loader samples them: the cat_max_ratio test sees the
  label with unseen classes mapped to 255, so no unseen-class information picks the crops.
- **Validation is not cached.** Evaluation resizes each image to its short side and runs
  overlapping sliding windows (crop 512, stride 426), so the number of windows varies per
  image; the trainer evaluates val online a few times per run, and caching every window
  of every val image would cost disk (2-3 windows x 7.3 MB per COCO image) for little
  speed-up. `cache-features --split val` therefore refuses with that reason.
- **Join by a small index, not HDF5 virtual datasets.** A virtual dataset whose source
  file is missing silently reads as fill values (zeros); the index lists the shard files
  with a per-shard random uid, so a missing or replaced shard is a clear error when the
  cache is opened. The index also holds the small per-row metadata (ids, views, class
  presence), so readers never scan the shards to build their item list.
- **Crash safety and resume.** A shard is written to `<out>.partial`; every dataset is
  allocated at creation (fixed size, early allocation, no fill), so writing a batch only
  writes raw data. After each batch the file is flushed, then the rows' `done` flags are
  set and flushed again, so after a kill the `done` flags are a prefix of written rows
  and a rerun resumes after it. The finished file is renamed onto `<out>` (atomic). An
  existing complete `<out>` is never modified: a rerun with the same config is a no-op, a
  different config is refused unless `overwrite=True` (then replaced only by the rename).
- **Precision.** The encoder runs in fp32; taps and global token are stored fp16.

Shard file layout (M = rows = images in the shard x V; L taps, N = h*w tokens, C width)::

    /taps          (M, L, N, C) float16, chunks (1, L, N, C): one view per chunk
    /global_token  (M, C)       float16
    /image_index   (M,)         int64    index of the image in the split list
    /view_index    (M,)         int16
    /ids           (M,)         S<n>     image id
    /view          (M,)         S512     JSON of cascade_clip.data.transforms.View
    /present       (M, K)       uint8    classes present in the image's full label
    /done          (M,)         uint8    1 once the row is written and flushed
    attrs: kind, format_version, code_version, model, weights_digest, tapped_blocks,
           tap_projection, tap_seed, input_size, mean, std, dataset, split, unseen,
           image_list_digest, num_images, seed, views_per_image, augment, grid,
           embed_dim, num_classes, shard_index, shard_count, image_start, image_stop,
           num_rows, shard_uid, complete, created

The joined index file holds the same provenance attributes plus `shard_files` (paths
relative to the index), `shard_uids`, `shard_rows`, and the concatenated `image_index`,
`view_index`, `ids`, `view`, `present` of all rows.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
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
from cascade_clip.config import ClipConfig, Config
from cascade_clip.errors import InputError, MissingInputError
from cascade_clip.model.encoder import TapFeatures

CACHE_FORMAT_VERSION = 1
SHARD_KIND = "cascade-clip/feature-shard"
INDEX_KIND = "cascade-clip/feature-index"
PARTIAL_SUFFIX = ".partial"
VIEW_BYTES = 512
GLOBAL_CHUNK_ROWS = 256

# Provenance fields compared when a cache is opened against a config. `tapped_blocks` is
# compared as "the cache holds every block the config taps" (ablations may tap a subset).
PROVENANCE_FIELDS = (
    "format_version",
    "model",
    "weights_digest",
    "tapped_blocks",
    "tap_projection",
    "tap_seed",
    "input_size",
    "mean",
    "std",
    "dataset",
    "split",
    "unseen",
    "image_list_digest",
    "num_images",
    "seed",
    "views_per_image",
    "augment",
)


class CacheError(InputError):
    """A feature or text cache is missing, incomplete, corrupt, or does not fit the config."""


class CacheMismatchError(CacheError):
    """A cache's provenance attribute differs from what the config asks for."""

    def __init__(self, path: str | Path, field: str, cached: Any, wanted: Any, hint: str = ""):
        self.path, self.field, self.cached, self.wanted = Path(path), field, cached, wanted
        msg = f"{path}: cache field '{field}' is {cached!r} but the config wants {wanted!r}"
        super().__init__(msg + (f"; {hint}" if hint else ""))


# --- provenance -------------------------------------------------------------------------------

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, memoised per process on (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def weights_digest(clip: ClipConfig) -> str:
    """A digest naming the CLIP weights without loading them.

    - a weights file: `sha256:<file digest>` (plus the model config's digest if given);
    - an open_clip pretrained tag: `open_clip:<model>/<tag>` (open_clip pins those files);
    - `pretrained: random` (seeded random init, tests and benchmarks only):
      `config-sha256:<digest of the model config>`; such caches are only consistent with
      the very model object that wrote them.
    """
    parts = []
    if clip.model_config is not None:
        if isinstance(clip.model_config, dict):
            cfg_text = _canonical_json(clip.model_config)
        else:
            path = Path(clip.model_config)
            if not path.is_file():
                raise MissingInputError(f"{path}: open_clip model config not found")
            cfg_text = _canonical_json(json.loads(path.read_text()))
        parts.append("config-sha256:" + hashlib.sha256(cfg_text.encode()).hexdigest())
    pretrained = clip.pretrained
    if pretrained and pretrained != "random":
        path = Path(pretrained)
        if path.is_file():
            parts.insert(0, "sha256:" + file_sha256(path))
        elif "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")):
            raise MissingInputError(f"{path}: CLIP weights file not found")
        else:
            parts.insert(0, f"open_clip:{clip.model}/{pretrained}")
    if not parts:
        parts.append(f"random:{clip.model}")
    return "+".join(parts)


def image_list_digest(ids: Sequence[str]) -> str:
    """sha256 of the split's image ids, one per line, in order."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def unseen_names(cfg: Config) -> list[str]:
    """The configured unseen class names (see cascade_clip.data.registry.unseen_class_names)."""
    from cascade_clip.data.registry import unseen_class_names

    return unseen_class_names(cfg.dataset.name, cfg.dataset.unseen, cfg.dataset.root)


def tapped_blocks(cfg: Config) -> list[int]:
    """1-based tapped blocks in the head's order (stages flattened)."""
    return [b for stage in cfg.model.stages for b in stage]


def provenance(cfg: Config, split: str, image_ids: Sequence[str]) -> dict[str, Any]:
    """The attributes that must match between a cache and the config that reads it."""
    from cascade_clip.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    return {
        "format_version": CACHE_FORMAT_VERSION,
        "model": cfg.clip.model,
        "weights_digest": weights_digest(cfg.clip),
        "tapped_blocks": tapped_blocks(cfg),
        "tap_projection": cfg.model.tap_projection,
        "tap_seed": int(cfg.model.tap_seed),
        "cls_token": cfg.model.cls_token,
        "pos_resize": cfg.clip.pos_resize,
        "input_size": int(cfg.train.augment.crop_size),
        "mean": [float(v) for v in IMAGENET_MEAN],
        "std": [float(v) for v in IMAGENET_STD],
        "dataset": cfg.dataset.name,
        "split": split,
        "unseen": sorted(unseen_names(cfg)),
        "image_list_digest": image_list_digest(image_ids),
        "num_images": len(image_ids),
        "seed": int(cfg.seed),
        "views_per_image": int(cfg.cache.views_per_image),
        "augment": _canonical_json(dataclasses.asdict(cfg.train.augment)),
    }


def _py(value: Any) -> Any:
    """HDF5 attribute value -> plain Python (lists for arrays, str for bytes)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_py(v) for v in value]
    return value


def _attrs(h5: h5py.File | h5py.Group) -> dict[str, Any]:
    return {k: _py(v) for k, v in h5.attrs.items()}


def check_provenance(attrs: dict[str, Any], wanted: dict[str, Any], path: str | Path) -> None:
    """Raise CacheMismatchError naming the first field of `wanted` the cache differs in."""
    hint = "rebuild the cache (cascade-clip cache-features) or use the config that made it"
    for field in PROVENANCE_FIELDS:
        if field not in wanted:
            continue
        if field not in attrs:
            raise CacheError(f"{path}: cache has no '{field}' attribute (not a cascade-clip cache?)")
        cached, want = _py(attrs[field]), wanted[field]
        if field == "tapped_blocks":
            missing = [b for b in want if b not in cached]
            if missing:
                raise CacheMismatchError(
                    path, field, cached, want, f"block(s) {missing} are not cached; {hint}"
                )
        elif field in ("mean", "std"):
            if len(cached) != len(want) or not np.allclose(cached, want):
                raise CacheMismatchError(path, field, cached, want, hint)
        elif cached != want:
            raise CacheMismatchError(path, field, cached, want, hint)


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


def _open_h5(path: str | Path, mode: str = "r") -> h5py.File:
    """h5py.File with a one-line error naming the file for a missing or unreadable one."""
    path = Path(path)
    if mode in ("r", "r+") and not path.is_file():
        raise MissingInputError(f"{path}: cache file not found")
    if mode not in ("r", "r+"):
        return h5py.File(path, mode)  # creating: OSError (disk full) is the caller's to report
    try:
        return h5py.File(path, mode)
    except OSError as err:
        raise CacheError(f"{path}: not a readable HDF5 file, truncated or corrupt ({err})") from None


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
) -> None:
    """Create `path` with every dataset allocated and the static per-row metadata written."""
    m, k = plan.num_rows, shapes["num_classes"]
    l_, n, c = shapes["num_taps"], shapes["num_tokens"], shapes["embed_dim"]
    id_bytes = max(1, max((len(i.encode()) for i in ids), default=1))
    with _open_h5(path, "w") as f:
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
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        _create(f, "taps", (m, l_, n, c), np.float16, (1, l_, n, c), compression)
        _create(f, "global_token", (m, c), np.float16, (min(max(m, 1), GLOBAL_CHUNK_ROWS), c))
        _create(f, "view", (m,), f"S{VIEW_BYTES}")
        _create(f, "present", (m, k), np.uint8)
        f.create_dataset("done", data=np.zeros(m, np.uint8), dcpl=_dcpl(None))
        rows = [plan.row(r) for r in range(m)]
        f.create_dataset("image_index", data=np.array([i for i, _ in rows], dtype=np.int64).reshape(m))
        f.create_dataset("view_index", data=np.array([v for _, v in rows], dtype=np.int16).reshape(m))
        f.create_dataset("ids", data=np.array([ids[i].encode() for i, _ in rows], dtype=f"S{id_bytes}"))


def _done_prefix(f: h5py.File) -> int:
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
        self.data = SegmentationDataset(cfg.dataset.root, split, unseen=unseen_names(cfg), mode="inductive")
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
    with _open_h5(out) as f:
        attrs = _attrs(f)
        check_provenance(attrs, prov, out)
        for key, want in (("shard_index", plan.index), ("shard_count", plan.count)):
            if attrs.get(key) != want:
                raise CacheMismatchError(out, key, attrs.get(key), want)
        return bool(attrs.get("complete")) and _done_prefix(f) == plan.num_rows


def _resumable(partial: Path, prov: dict[str, Any], plan: ShardPlan, log: Callable[[str], None]) -> bool:
    """Can `partial` be resumed? A stale or unreadable one is deleted (it was never verified)."""
    if not partial.exists():
        return False
    try:
        with _open_h5(partial) as f:
            attrs = _attrs(f)
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
    data = SegmentationDataset(cfg.dataset.root, split, unseen=unseen_names(cfg), mode="inductive")
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
                          cfg.cache.compression)
        except OSError as err:
            raise _write_error(partial, 0, plan.num_rows, err) from None
    _fill_shard(partial, cfg, split, plan, model, device, workers, progress, log)
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

    with _open_h5(partial) as f:
        start = _done_prefix(f)
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
    with _open_h5(partial, "r+") as f:
        for batch in batches:
            with torch.inference_mode():
                feats = model.encode(batch["image"].to(device))
            taps = feats.taps.transpose(0, 1).to(torch.float16).cpu().numpy()  # (B, L, N, C)
            glob = feats.global_token.to(torch.float16).cpu().numpy()
            first, stop = batch["row"][0], batch["row"][-1] + 1
            if first != done:
                raise CacheError(f"{partial}: rows out of order (got {first}, expected {done})")
            if not (np.isfinite(taps).all() and np.isfinite(glob).all()):
                rows = f"{first}..{stop - 1}"
                raise CacheError(f"{partial}: the encoder gave non-finite features in rows {rows}")
            try:
                _write_rows(f, first, {"taps": taps, "global_token": glob, "view": batch["view"],
                                       "present": batch["present"]})
                _mark_done(f, first, stop)
            except OSError as err:
                raise _write_error(partial, done, plan.num_rows, err) from None
            done = stop
            bar.update(stop - first)
    bar.close()


def _finish(partial: Path, out: Path, plan: ShardPlan) -> None:
    """Mark `partial` complete, check its done flags and rename it onto `out`."""
    try:
        with _open_h5(partial, "r+") as f:
            if _done_prefix(f) != plan.num_rows:
                raise CacheError(f"{partial}: {_done_prefix(f)}/{plan.num_rows} rows written")
            f.attrs["complete"] = True
            f.flush()
    except OSError as err:
        raise _write_error(partial, plan.num_rows, plan.num_rows, err) from None
    os.replace(partial, out)


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
    attrs = _attrs(f)
    if attrs.get("kind") != SHARD_KIND:
        raise CacheError(f"{path}: not a cascade-clip feature shard (kind={attrs.get('kind')!r})")
    if attrs.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheMismatchError(path, "format_version", attrs.get("format_version"), CACHE_FORMAT_VERSION)
    if not attrs.get("complete"):
        raise CacheError(f"{path}: shard is incomplete (rerun cache-features to resume it)")
    return attrs


def open_layout(path: str | Path) -> CacheLayout:
    """Read a joined index, or a single complete shard, into a CacheLayout.

    Every shard an index lists must exist and carry the uid the index recorded.
    """
    path = Path(path)
    with _open_h5(path) as f:
        kind = _py(f.attrs.get("kind"))
        if kind == SHARD_KIND:
            attrs = _check_shard_file(f, path)
            meta = _read_rows_meta(f, path)
            return CacheLayout(path, attrs, [path], [attrs["shard_uid"]],
                               np.array([0, attrs["num_rows"]]), **meta)
        if kind != INDEX_KIND:
            raise CacheError(f"{path}: not a cascade-clip feature cache (kind={kind!r})")
        attrs = _attrs(f)
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
        with _open_h5(shard) as sf:
            got = _py(sf.attrs.get("shard_uid"))
        if got != uid:
            raise CacheError(f"{path}: shard {shard} was rewritten after the join (uid differs); rejoin")
    return CacheLayout(path, attrs, files, uids, np.concatenate([[0], np.cumsum(rows)]), **meta)


# --- join -------------------------------------------------------------------------------------

_SHARD_ONLY_ATTRS = ("shard_index", "image_start", "image_stop", "num_rows", "shard_uid", "complete",
                     "created", "code_version")


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
        with _open_h5(p) as f:
            attrs = _check_shard_file(f, p)
            if _done_prefix(f) != attrs["num_rows"]:
                raise CacheError(f"{p}: marked complete but not every row is written")
            meta = _read_rows_meta(f, p)
        if first is None:
            first = (p, attrs)
        else:
            for key in (*PROVENANCE_FIELDS, "shard_count", "grid", "embed_dim", "num_classes"):
                if _py(attrs.get(key)) != _py(first[1].get(key)):
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
    index), shapes and dtypes of every shard, `done` flags, and finiteness and unit norm of
    the stored tokens (every row, or `sample` evenly spaced rows). Returns a summary dict.
    """
    from tqdm import tqdm

    from cascade_clip.data.dataset import SegmentationDataset

    path = Path(path)
    split = split or cfg.dataset.train_split
    layout = open_layout(path)
    ids = SegmentationDataset(cfg.dataset.root, split, unseen=unseen_names(cfg), mode="eval").ids
    check_provenance(layout.attrs, provenance(cfg, split, ids), path)
    views = int(layout.attrs["views_per_image"])
    if _py(layout.attrs["kind"]) == INDEX_KIND:
        counts = np.bincount(layout.image_index, minlength=len(ids))
        if layout.num_rows != len(ids) * views or len(counts) != len(ids) or (counts != views).any():
            raise CacheError(f"{path}: {layout.num_rows} rows, expected {len(ids)} images x {views} views")
    if [ids[i] for i in layout.image_index] != layout.ids:
        raise CacheError(f"{path}: stored image ids do not match the split list")
    l_, (h, w), c = len(layout.blocks), layout.grid, int(layout.attrs["embed_dim"])
    rows_to_check = _rows_to_check(layout.num_rows, sample)
    bar = tqdm(total=len(rows_to_check), unit="row", disable=not progress, desc="verify")
    worst = 0.0
    for s, shard in enumerate(layout.shard_files):
        lo, hi = int(layout.offsets[s]), int(layout.offsets[s + 1])
        with _open_h5(shard) as f:
            _check_shard_file(f, shard)
            _check_dataset(f, shard, "taps", (hi - lo, l_, h * w, c), np.float16)
            _check_dataset(f, shard, "global_token", (hi - lo, c), np.float16)
            if _done_prefix(f) != hi - lo:
                raise CacheError(f"{shard}: only {_done_prefix(f)}/{hi - lo} rows written")
            mine = [r - lo for r in rows_to_check if lo <= r < hi]
            for r in mine:
                worst = max(worst, _check_row(f, shard, r))
                bar.update(1)
    bar.close()
    return {"path": str(path), "rows": layout.num_rows, "shards": len(layout.shard_files),
            "views_per_image": views, "taps": layout.blocks, "grid": [h, w], "embed_dim": c,
            "rows_checked": len(rows_to_check), "max_norm_error": worst}


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


def _check_row(f: h5py.File, path: Path, r: int) -> float:
    """Finiteness and unit norm of one row; returns the largest |norm - 1|."""
    try:
        taps = f["taps"][r].astype(np.float32)
        glob = f["global_token"][r].astype(np.float32)
    except OSError as err:
        raise CacheError(f"{path}: row {r} unreadable, truncated or corrupt ({err})") from None
    if not (np.isfinite(taps).all() and np.isfinite(glob).all()):
        raise CacheError(f"{path}: row {r} holds non-finite values")
    err = max(float(np.abs(np.linalg.norm(taps, axis=-1) - 1).max()), abs(float(np.linalg.norm(glob)) - 1))
    if err > 1e-2:
        raise CacheError(f"{path}: row {r} is not L2-normalised (|norm - 1| = {err:.3g})")
    return err


# --- reader -----------------------------------------------------------------------------------


class FeatureCacheDataset(Dataset):
    """Training items from a feature cache: one item per cached (image, view) row.

    Items: taps float16 (L, N, C) in the config's block order, global_token float16 (C,),
    label int64 (crop, crop) rebuilt from the stored view in `mode` (inductive: unseen ->
    255, transductive: unseen -> 254, fully_supervised/eval: untouched), grid int64 (2,),
    id str, index int (image index in the split), view int. The default collate works.

    HDF5 handles open lazily in the process that reads (never across fork). With
    `dataset.drop_unseen_images` in inductive mode, rows of images containing an unseen
    class are left out (from the cached class presence).
    """

    def __init__(self, cache_path: str | Path, cfg: Config, split: str | None = None,
                 mode: str = "inductive"):
        from cascade_clip.data.dataset import SegmentationDataset

        self.path = Path(cache_path)
        split = split or cfg.dataset.train_split
        self.layout = open_layout(self.path)
        self.data = SegmentationDataset(cfg.dataset.root, split, unseen=unseen_names(cfg), mode=mode)
        check_provenance(self.layout.attrs, provenance(cfg, split, self.data.ids), self.path)
        cached = self.layout.blocks
        self.block_order = [cached.index(b) for b in tapped_blocks(cfg)]  # checked: all present
        self._all_blocks = self.block_order == list(range(len(cached)))
        rows = np.arange(self.layout.num_rows)
        if mode == "inductive" and cfg.dataset.drop_unseen_images and self.data.unseen_ids:
            has_unseen = self.layout.present[:, self.data.unseen_ids].any(axis=1)
            rows = rows[~has_unseen]
        self.rows = rows
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout.grid

    @property
    def blocks(self) -> list[int]:
        """The blocks along an item's taps axis: the config's tapped blocks, in its order
        (a subset or reordering of `cached_blocks`)."""
        return [self.layout.blocks[i] for i in self.block_order]

    @property
    def cached_blocks(self) -> list[int]:
        return self.layout.blocks

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # a forked worker: never use the parent's handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = _open_h5(self.layout.shard_files[shard])
        return self._handles[shard]

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def view(self, i: int):
        """The stored View of item `i`."""
        from cascade_clip.data.transforms import View

        raw = self.layout.views[self.rows[i]].rstrip(b"\0")
        return View.from_dict(json.loads(raw))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def _read_rows(self, shard: int, local: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """taps (n, L, N, C) and global tokens (n, C) of shard rows `local` (increasing,
        distinct): one HDF5 read per dataset instead of one per row."""
        f = self._handle(shard)
        try:
            if len(local) == 1:
                return f["taps"][local[0]][None], f["global_token"][local[0]][None]
            return f["taps"][local], f["global_token"][local]
        except OSError as err:
            path = self.layout.shard_files[shard]
            raise CacheError(f"{path}: rows {local[:4]} unreadable, truncated or corrupt ({err})") from None

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """Items `indices` (what the DataLoader's batched fetch calls): rows are grouped by
        shard and read in one sorted call each, so a cached batch costs a few HDF5 reads,
        not one per image."""
        rows = [int(self.rows[i]) for i in indices]
        by_shard: dict[int, list[int]] = {}
        for row in rows:
            by_shard.setdefault(self.layout.locate(row)[0], []).append(row)
        fetched: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for shard, shard_rows in by_shard.items():
            unique = sorted(set(shard_rows))
            taps, glob = self._read_rows(shard, [self.layout.locate(r)[1] for r in unique])
            for k, row in enumerate(unique):
                fetched[row] = (taps[k], glob[k])
        return [self._item(i, row, *fetched[row]) for i, row in zip(indices, rows)]

    def _item(self, i: int, row: int, taps: np.ndarray, glob: np.ndarray) -> dict[str, Any]:
        from cascade_clip.data.dataset import read_label
        from cascade_clip.data.transforms import apply_view_to_label

        if not self._all_blocks:
            taps = taps[self.block_order]
        index = int(self.layout.image_index[row])
        image_id = self.layout.ids[row]
        label = read_label(self.data.label_path(image_id), self.data.num_classes)
        label = apply_view_to_label(self.data.lut[label], self.view(i))
        return {
            "taps": torch.from_numpy(np.ascontiguousarray(taps)),
            "global_token": torch.from_numpy(glob),
            "label": label,
            "grid": torch.tensor(self.grid),
            "id": image_id,
            "index": index,
            "view": int(self.layout.view_index[row]),
        }


def to_tap_features(batch: dict[str, Any], grid: tuple[int, int] | None = None) -> TapFeatures:
    """A collated batch -> TapFeatures: taps (L, B, N, C) float32, global_token (B, C) float32.

    `grid` defaults to the batch's "grid" entry (the cache's token grid).
    """
    if grid is None:
        g = batch["grid"]
        grid = (int(g[0][0]), int(g[0][1])) if g.dim() == 2 else (int(g[0]), int(g[1]))
    taps = batch["taps"].float().transpose(0, 1).contiguous()
    return TapFeatures(taps=taps, global_token=batch["global_token"].float(), grid=grid)
