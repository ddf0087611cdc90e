"""cascade_clip.data: the dataset registry, converters, loaders and augmentation.

The common on-disk format (every dataset, the synthetic "shapes" world included)::

    <root>/dataset.json   {"name", "classes" (train-id order), "image_suffix", "label_suffix"}
    <root>/images/<split>/<id><image_suffix>   RGB
    <root>/labels/<split>/<id><label_suffix>   uint8 PNG, mode "L": train ids 0..K-1, 255 ignore
                                               (K > 254: 16-bit PNG, 65535 ignore; see below)
    <root>/splits/<split>.txt                  one id per line
    <root>/captions/<split>.jsonl              (shapes only) {"id", "caption", "classes"}

A dataset of more than 254 classes (PASCAL Context-459, ADE20K-847) cannot hold its ids in a
byte: its labels are 16-bit grayscale PNGs (PIL mode "I;16") with 65535 = ignore, as the
peers' 16-bit TIFFs (MaskFormer, SAN, CAT-Seg). Such a dataset is an evaluation target only
(training marks unseen pixels in a byte); `label_ignore_index(K)` gives its ignore value.

This package module stays light (no torch): the loader lives in
`cascade_clip.data.dataset`, augmentation in `cascade_clip.data.transforms`.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = 255
"""Label value for pixels that count for no class (void, boundary, inductive unseen)."""

UNSEEN_INDEX = 254
"""Transductive mode marks unseen-class pixels with this value for self-training."""

IGNORE_INDEX_16 = 65535
"""Ignore value of 16-bit labels (datasets of more than 254 classes)."""

MAX_BYTE_CLASSES = 254
"""The most classes a uint8 label holds beside 254 (unseen) and 255 (ignore)."""


def label_ignore_index(num_classes: int) -> int:
    """The ignore value of a dataset's labels: 255 (uint8) up to 254 classes, else 65535."""
    return IGNORE_INDEX if num_classes <= MAX_BYTE_CLASSES else IGNORE_INDEX_16

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
    "IGNORE_INDEX_16",
    "MAX_BYTE_CLASSES",
    "UNSEEN_INDEX",
    "DatasetSpec",
    "SegmentationDataset",
    "get_spec",
    "label_ignore_index",
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
