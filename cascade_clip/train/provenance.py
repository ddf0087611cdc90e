"""What a run consumed, as digests: `--resume` continues a run only when they are unchanged.

Every checkpoint of a run holds `inputs` (docs/design.md: The workflow):

    clip     the frozen CLIP's weights digest (cascade_clip.cache.weights_digest)
    text     sha256 of the class text embeddings the run queries with (from --text, or computed)
    init     sha256 of the --init checkpoint's weights; None without --init
    cache    sha256 of the feature cache: its provenance, its rows' metadata and the taps of a
             sample of rows (a cache rebuilt alike keeps it, one of other features does not);
             None when the run reads images
    dataset  sha256 of the training split: class names, image ids, label files, and the image
             files when the run reads images (through the cache they reach it as features)

and `dataset_files`, a digest of the class names and those files' paths inside the dataset
folder, sizes and modification times. A resume whose files still match it takes the recorded dataset digest
without reading them (moving the folder keeps all three); otherwise it reads them again. A
dataset or cache a caller hands to `train()` as an object is recorded as "given", unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade_clip.cache import PROVENANCE_FIELDS, FeatureCacheDataset, file_sha256
from cascade_clip.cache.provenance import attr_value

INPUT_KEYS = ("clip", "text", "init", "cache", "dataset")
CACHE_SAMPLE_ROWS = 16  # rows of the cache whose taps enter its digest
GIVEN = "given"


def tensor_digest(tensors: Mapping[str, torch.Tensor] | torch.Tensor) -> str:
    """sha256 of tensors' names, dtypes, shapes and bytes."""
    if isinstance(tensors, torch.Tensor):
        tensors = {"": tensors}
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_digest(dataset: FeatureCacheDataset, sample: int = CACHE_SAMPLE_ROWS) -> str:
    """sha256 of a feature cache as training reads it: the compared provenance attributes, the
    per-row metadata (ids, views, class presence) and the taps and global tokens of `sample`
    evenly spaced rows. Not the shard files' uids: a cache rebuilt from the same images, CLIP
    and settings (the workflow rebuilds it after the data moved) has the same digest."""
    layout = dataset.layout
    attrs = {k: layout.attrs[k] for k in PROVENANCE_FIELDS if k in layout.attrs}
    h = hashlib.sha256(json.dumps({k: attr_value(v) for k, v in attrs.items()}, sort_keys=True).encode())
    for meta in (layout.image_index, layout.view_index, layout.views, layout.present, dataset.rows):
        h.update(np.ascontiguousarray(meta).tobytes())
    h.update("\n".join(layout.ids).encode())
    n = len(dataset)
    for item in dataset.__getitems__(sorted({int(i) for i in np.linspace(0, n - 1, min(sample, n))})):
        h.update(item["taps"].numpy().tobytes())
        h.update(item["global_token"].numpy().tobytes())
    dataset.close()  # no open file handles into the loader's forked workers
    return h.hexdigest()


def dataset_files(data: Any, images: bool) -> list[Path]:
    """The files a run reads of a SegmentationDataset: every label, and every image if `images`."""
    files = []
    for image_id in data.ids:
        if images:
            files.append(data.image_path(image_id))
        files.append(data.label_path(image_id))
    return files


def files_fingerprint(data: Any, files: Sequence[Path]) -> str:
    """sha256 of the dataset's class names and the files' paths inside its folder, sizes and
    modification times (a stat each)."""
    h = hashlib.sha256(json.dumps(list(data.classes)).encode())
    root = data.root
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def dataset_digest(data: Any, files: Sequence[Path]) -> str:
    """sha256 of the split's class names, ids and the files' contents (read in parallel)."""
    workers = min(16, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL on large reads
        contents = list(pool.map(file_sha256, files))
    h = hashlib.sha256(json.dumps([list(data.classes), list(data.ids)]).encode())
    for path, digest in zip(files, contents):
        h.update(f"{path.name}|{digest}\n".encode())
    return h.hexdigest()


def run_inputs(
    clip: str,
    queries: torch.Tensor,
    init_state: dict[str, Any] | None,
    dataset: Any,
    saved: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], str | None]:
    """(this run's `inputs`, its `dataset_files` fingerprint). `saved` is the checkpoint a
    resume would continue: its dataset digest is taken when the files still match its
    fingerprint."""
    inputs: dict[str, Any] = {
        "clip": clip,
        "text": tensor_digest(queries),
        "init": None if init_state is None else tensor_digest(init_state["model"]),
        "cache": None,
        "dataset": GIVEN,
    }
    data, read_images = dataset, True
    if isinstance(dataset, FeatureCacheDataset):
        inputs["cache"] = cache_digest(dataset)
        data, read_images = dataset.data, False
    elif not hasattr(dataset, "image_path"):  # a dataset object of the caller's
        return inputs, None
    files = dataset_files(data, read_images)
    fingerprint = files_fingerprint(data, files)
    if saved is not None and saved.get("dataset_files") == fingerprint and "inputs" in saved:
        inputs["dataset"] = saved["inputs"].get("dataset")
    else:
        inputs["dataset"] = dataset_digest(data, files)
    return inputs, fingerprint


def input_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """What a run consumes differently from the checkpoint's record: "dataset: 3f2a9c01 -> 77b0e1d4"."""
    if saved is None:
        return ["inputs: not recorded (a checkpoint of an older version)"]

    def short(value: Any) -> str:
        text = str(value)
        return text if len(text) <= 20 else text[:16] + "..."

    return [
        f"{key}: {short(saved.get(key))} -> {short(current.get(key))}"
        for key in INPUT_KEYS
        if saved.get(key) != current.get(key) and GIVEN not in (saved.get(key), current.get(key))
    ]
