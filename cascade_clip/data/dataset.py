"""`SegmentationDataset`: a torch Dataset over the common on-disk format.

Modes (docs/design.md: The model, settings):

- "inductive": unseen-class pixels become 255 (ignore); with `drop_unseen_images=True`
  images whose label contains any unseen class are left out.
- "transductive": unseen-class pixels become 254 (UNSEEN_INDEX) so self-training can find
  and pseudo-label them.
- "fully_supervised" and "eval": labels untouched.

Items are dicts: image (3, H, W) float32 ImageNet-normalised, label (H, W) int64, id (str),
index (int). A transform is called as `transform(image, label, rng)` with image (H, W, 3)
uint8, label (H, W) uint8 (already mode-mapped) and `rng` = `sample_rng(seed, epoch, index)`,
and returns `(image_tensor, label_tensor)` or `(image_tensor, label_tensor, extra_dict)`.
Call `set_epoch(epoch)` each epoch (with non-persistent workers) for fresh augmentation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cascade_clip.data import IGNORE_INDEX, MAX_BYTE_CLASSES, UNSEEN_INDEX, label_ignore_index
from cascade_clip.data.registry import read_dataset_json, resolve_split
from cascade_clip.data.transforms import normalize, sample_rng
from cascade_clip.errors import InputError, MissingInputError

MODES = ("inductive", "transductive", "fully_supervised", "eval")


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; missing or unreadable files raise an error naming the file."""
    if not path.is_file():
        raise MissingInputError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: unreadable image ({err})") from None


def read_label(path: Path, num_classes: int) -> np.ndarray:
    """(H, W) train ids: uint8 (values 0..num_classes-1 or 255), or for more than 254
    classes uint16 from a 16-bit PNG (values 0..num_classes-1 or 65535)."""
    if not path.is_file():
        raise MissingInputError(f"{path}: label not found")
    wide = num_classes > MAX_BYTE_CLASSES
    modes, dtype = (("I;16", "I"), np.uint16) if wide else (("L", "P"), np.uint8)
    try:
        with Image.open(path) as im:
            if im.mode not in modes:
                want = "a 16-bit grayscale PNG" if wide else "single-channel 'L'"
                raise InputError(f"{path}: label has mode {im.mode!r}; expected {want}")
            raw = np.asarray(im)
    except (OSError, SyntaxError) as err:
        raise InputError(f"{path}: unreadable label ({err})") from None
    ignore = label_ignore_index(num_classes)
    values = np.unique(raw)
    bad = values[((values >= num_classes) & (values != ignore)) | (values < 0)]
    if bad.size:
        shown = [int(v) for v in bad[:8]]
        raise InputError(
            f"{path}: label values {shown} are neither train ids 0..{num_classes - 1} nor {ignore}"
        )
    return raw.astype(dtype)


class SegmentationDataset(Dataset):
    """Images and train-id labels of one split of a prepared dataset (see module doc).

    root: dataset folder holding dataset.json; split: a name with splits/<split>.txt;
    unseen: class names (or train ids) held out; mode: inductive | transductive |
    fully_supervised | eval; transform: see module doc (None: full-size normalised image);
    drop_unseen_images: inductive only, leave out images containing unseen classes;
    seed: base of the per-sample augmentation generator.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        unseen: Iterable[str | int] = (),
        mode: str = "inductive",
        transform: Callable | None = None,
        drop_unseen_images: bool = False,
        *,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; expected one of {MODES}")
        self.root = Path(root)
        self.split = split
        self.mode = mode
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        meta = read_dataset_json(self.root)
        self.name: str = meta["name"]
        self.classes: tuple[str, ...] = tuple(meta["classes"])
        self.image_suffix: str = meta["image_suffix"]
        self.label_suffix: str = meta["label_suffix"]
        self.seen_ids, self.unseen_ids = self._resolve_unseen(list(unseen))
        self.ignore_index = label_ignore_index(len(self.classes))
        if len(self.classes) > MAX_BYTE_CLASSES and mode != "eval":
            raise InputError(
                f"{self.root / 'dataset.json'}: {len(self.classes)} classes (16-bit labels) make an "
                f"evaluation target; training reads at most {MAX_BYTE_CLASSES} classes"
            )

        self.lut = np.arange(256, dtype=np.uint8)
        if mode == "inductive":
            self.lut[self.unseen_ids] = IGNORE_INDEX
        elif mode == "transductive":
            self.lut[self.unseen_ids] = UNSEEN_INDEX

        self.ids = self._read_split()
        self.dropped: list[str] = []
        if drop_unseen_images and mode == "inductive" and self.unseen_ids:
            unseen = set(self.unseen_ids)
            presence = self.class_presence()
            keep = [i for i in self.ids if not unseen.intersection(presence[i])]
            self.dropped = [i for i in self.ids if unseen.intersection(presence[i])]
            self.ids = keep

    # --- setup -----------------------------------------------------------------------

    def _resolve_unseen(self, unseen: list[str | int]) -> tuple[list[int], list[int]]:
        names = []
        for u in unseen:
            if isinstance(u, (int, np.integer)) and not isinstance(u, bool):
                if not 0 <= int(u) < len(self.classes):
                    raise InputError(
                        f"{self.root}: unseen id {u} is not a train id 0..{len(self.classes) - 1}"
                    )
                names.append(self.classes[int(u)])
            else:
                names.append(str(u))
        try:
            return resolve_split(self.classes, names)
        except ValueError as err:
            raise InputError(f"{self.root / 'dataset.json'}: {err}") from None

    def _read_split(self) -> list[str]:
        path = self.root / "splits" / f"{self.split}.txt"
        if not path.is_file():
            raise MissingInputError(f"{path}: split list not found")
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not ids:
            raise InputError(f"{path}: split list is empty")
        if len(set(ids)) != len(ids):
            raise InputError(f"{path}: split list repeats an id")
        return ids

    def class_presence(self) -> dict[str, list[int]]:
        """{id: train ids present} for the split: from splits/<split>.classes.json when it
        covers every id (converters write it), else by reading every label."""
        index = self.root / "splits" / f"{self.split}.classes.json"
        if index.is_file():
            try:
                data = json.loads(index.read_text())
            except json.JSONDecodeError as err:
                raise InputError(f"{index}: not valid JSON ({err})") from None
            if all(i in data for i in self.ids):
                return {i: [int(c) for c in data[i]] for i in self.ids}
        out = {}
        for i in self.ids:
            label = read_label(self.label_path(i), len(self.classes))
            out[i] = [int(v) for v in np.unique(label) if v != self.ignore_index]
        return out

    # --- access ------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation is a function of (seed, epoch, index)."""
        self.epoch = int(epoch)

    def image_path(self, image_id: str) -> Path:
        return self.root / "images" / self.split / f"{image_id}{self.image_suffix}"

    def label_path(self, image_id: str) -> Path:
        return self.root / "labels" / self.split / f"{image_id}{self.label_suffix}"

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, label (H, W) uint8 (uint16 past 254 classes) as on disk,
        validated)."""
        image_id = self.ids[index]
        image = read_image(self.image_path(image_id))
        label_path = self.label_path(image_id)
        label = read_label(label_path, len(self.classes))
        if label.shape != image.shape[:2]:
            raise InputError(
                f"{label_path}: label size {label.shape[1]}x{label.shape[0]} differs from "
                f"image size {image.shape[1]}x{image.shape[0]}"
            )
        return image, label

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index = index % len(self)
        image, label = self.load_raw(index)
        if label.dtype == np.uint8:  # 16-bit labels are read in eval mode only, as they are
            label = self.lut[label]
        item: dict[str, Any] = {"id": self.ids[index], "index": index}
        if self.transform is None:
            item["image"] = normalize(image)
            item["label"] = torch.from_numpy(label.astype(np.int64))
        else:
            out = self.transform(image, label, sample_rng(self.seed, self.epoch, index))
            item["image"], item["label"] = out[0], out[1]
            if len(out) > 2:
                item.update(out[2])
        return item

    def __repr__(self) -> str:
        return (
            f"SegmentationDataset({self.name!r}, split={self.split!r}, mode={self.mode!r}, "
            f"{len(self)} images, {len(self.classes)} classes, unseen={len(self.unseen_ids)})"
        )
