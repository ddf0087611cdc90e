"""cascade_clip.data: the dataset registry, converters, loaders and augmentation.

The common on-disk format (every dataset, the synthetic "shapes" world included)::

    <root>/dataset.json   {"name", "classes" (train-id order), "image_suffix", "label_suffix"}
    <root>/images/<split>/<id><image_suffix>   RGB
    <root>/labels/<split>/<id><label_suffix>   uint8 PNG, mode "L": train ids 0..K-1, 255 ignore
    <root>/splits/<split>.txt                  one id per line
    <root>/captions/<split>.jsonl              (shapes only) {"id", "caption", "classes"}

This package module stays light (no torch): the loader lives in
`cascade_clip.data.dataset`, augmentation in `cascade_clip.data.transforms`.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = 255
"""Label value for pixels that count for no class (void, boundary, inductive unseen)."""

UNSEEN_INDEX = 254
"""Transductive mode marks unseen-class pixels with this value for self-training."""

from cascade_clip.data.registry import (  # noqa: E402
    DATASETS,
    DatasetSpec,
    get_spec,
    load_classes,
    read_dataset_json,
    resolve_split,
)

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "UNSEEN_INDEX",
    "DatasetSpec",
    "SegmentationDataset",
    "get_spec",
    "load_classes",
    "read_dataset_json",
    "resolve_split",
]


def __getattr__(name: str) -> Any:
    # The loader imports torch; load it only when asked for.
    if name == "SegmentationDataset":
        from cascade_clip.data.dataset import SegmentationDataset

        return SegmentationDataset
    raise AttributeError(f"module 'cascade_clip.data' has no attribute {name!r}")
