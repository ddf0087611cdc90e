"""What a cache file says about itself: format constants, errors, provenance digests and
the attribute helpers every cache module reads and writes with (docs/design.md: Feature cache)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cascade_clip.classes import config_unseen_names
from cascade_clip.config import ClipConfig, Config
from cascade_clip.errors import InputError, MissingInputError

# 2: cache.encoding (int8 taps), per-row checksums, shards verified when written
CACHE_FORMAT_VERSION = 2
SHARD_KIND = "cascade-clip/feature-shard"
INDEX_KIND = "cascade-clip/feature-index"
PARTIAL_SUFFIX = ".partial"
VIEW_BYTES = 512
GLOBAL_CHUNK_ROWS = 256

# Every config key a cache row could depend on, classified once, here. FEATURE_KEYS change
# what the encoder writes into a row (or which rows there are): each names the provenance
# attribute that records it, compared whenever a cache is written, resumed, joined or read.
# NOT_FEATURE_KEYS do not. tests/test_cache.py walks the config sections and fails on a key
# that is in neither, so a new key is classified before a cache can silently ignore it.
FEATURE_KEYS = {
    "seed": "seed",  # draws the cached views
    "clip.model": "model",
    "clip.pretrained": "weights_digest",
    "clip.model_config": "weights_digest",
    "clip.image_size": "input_size",  # the positional grid; the crop (augment) must match it
    "clip.pos_resize": "pos_resize",
    "model.stages": "tapped_blocks",
    "model.tap_projection": "tap_projection",
    "model.tap_seed": "tap_seed",
    "model.cls_token": "cls_token",
    "dataset.name": "dataset",
    "dataset.unseen": "unseen",  # the crop test sees unseen classes as ignore
    "dataset.train_split": "split",
    "cache.views_per_image": "views_per_image",
    "cache.encoding": "encoding",  # int8 rows hold other values than fp16 ones
    **{f"train.augment.{key}": "augment" for key in
       ("scale", "ratio_range", "crop_size", "cat_max_ratio", "flip", "photometric")},
}
NOT_FEATURE_KEYS = (
    "clip.templates", "clip.prompt_names",  # the text side
    "dataset.root", "dataset.source",  # where the images lie or came from; the image list says
                                       # what they are
    "dataset.val_split",  # never cached
    "dataset.drop_unseen_images",  # the reader leaves rows out, from the cached class presence
    "cache.compression", "cache.batch_size",  # how rows are stored, not their values
    "cache.enabled",  # whether a frozen row reads a cache at all, not what one holds
    "model.encoder_mode",  # a cache is written by the frozen encoder only
    "model.vpt_tokens", "model.vpt_prompt_norm",  # prompt tuning, never cached
    # the head, after the cache
    "model.fusion", "model.nga_sigma", "model.nga_learnable", "model.query_projection",
    "model.relationship_descriptor", "model.cascade", "model.seen_calibration",
    "model.decoders_per_stage", "model.sum_learnable",
    "model.decoder.layers", "model.decoder.heads", "model.decoder.ffn_dim", "model.decoder.dropout",
    "model.decoder.input_adapter",
)

# Provenance fields compared when a cache is opened against a config. `tapped_blocks` is
# compared as "the cache holds every block the config taps" (ablations may tap a subset).
PROVENANCE_FIELDS = (
    "format_version",
    "model",
    "weights_digest",
    "tapped_blocks",
    "tap_projection",
    "tap_seed",
    "cls_token",
    "pos_resize",
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
    "encoding",
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
        "input_size": int(cfg.clip.image_size),  # = the crop size: the writer refuses others
        "mean": [float(v) for v in IMAGENET_MEAN],
        "std": [float(v) for v in IMAGENET_STD],
        "dataset": cfg.dataset.name,
        "split": split,
        "unseen": sorted(config_unseen_names(cfg)),
        "image_list_digest": image_list_digest(image_ids),
        "num_images": len(image_ids),
        "seed": int(cfg.seed),
        "views_per_image": int(cfg.cache.views_per_image),
        "augment": _canonical_json(dataclasses.asdict(cfg.train.augment)),
        "encoding": cfg.cache.encoding,
    }


def attr_value(value: Any) -> Any:
    """HDF5 attribute value -> plain Python (lists for arrays, str for bytes)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [attr_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [attr_value(v) for v in value]
    return value


def read_attrs(h5: h5py.File | h5py.Group) -> dict[str, Any]:
    return {k: attr_value(v) for k, v in h5.attrs.items()}


def check_provenance(attrs: dict[str, Any], wanted: dict[str, Any], path: str | Path) -> None:
    """Raise CacheMismatchError naming the first field of `wanted` the cache differs in."""
    hint = "rebuild the cache (cascade-clip cache-features) or use the config that made it"
    for field in PROVENANCE_FIELDS:
        if field not in wanted:
            continue
        if field not in attrs:
            raise CacheError(f"{path}: cache has no '{field}' attribute (not a cascade-clip cache?)")
        cached, want = attr_value(attrs[field]), wanted[field]
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


def open_h5(path: str | Path, mode: str = "r") -> h5py.File:
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

