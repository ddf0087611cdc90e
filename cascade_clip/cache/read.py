"""Reading a feature cache for training: one item per cached (image, view) row."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from cascade_clip.cache.encoding import decode
from cascade_clip.cache.index import open_layout
from cascade_clip.cache.provenance import (
    CacheError,
    check_provenance,
    open_h5,
    provenance,
    tapped_blocks,
)
from cascade_clip.classes import config_unseen_names
from cascade_clip.config import Config
from cascade_clip.model.encoder import TapFeatures


class FeatureCacheDataset(Dataset):
    """Training items from a feature cache: one item per cached (image, view) row.

    Items: taps (L, N, C) as stored (float16, or int8 for `cache.encoding: int8`: decode
    them with `encoding.decode`, as `to_tap_features` and training do) in the config's
    block order, global_token float16 (C,),
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
        self.data = SegmentationDataset(cfg.dataset.root, split, unseen=config_unseen_names(cfg), mode=mode)
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
            self._handles[shard] = open_h5(self.layout.shard_files[shard])
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
        distinct), one row slice per row: a row is one taps chunk, and h5py's list indexing
        (`taps[local]`) builds a point selection that read the demo's batches of 16 rows
        75x slower (104 ms against 1.4 ms; benchmarks/NOTES.md)."""
        f = self._handle(shard)
        try:
            taps, glob = f["taps"], f["global_token"]
            return np.stack([taps[r] for r in local]), np.stack([glob[r] for r in local])
        except OSError as err:
            path = self.layout.shard_files[shard]
            raise CacheError(f"{path}: rows {local[:4]} unreadable, truncated or corrupt ({err})") from None

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """Items `indices` (what the DataLoader's batched fetch calls): rows are grouped by
        shard, and each shard's file handle is looked up once per batch."""
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
    """A collated batch -> TapFeatures: taps (L, B, N, C) float32 (decoded), global_token (B, C) float32.

    `grid` defaults to the batch's "grid" entry (the cache's token grid).
    """
    if grid is None:
        g = batch["grid"]
        grid = (int(g[0][0]), int(g[0][1])) if g.dim() == 2 else (int(g[0]), int(g[1]))
    taps = decode(batch["taps"]).transpose(0, 1).contiguous()
    return TapFeatures(taps=taps, global_token=batch["global_token"].float(), grid=grid)
