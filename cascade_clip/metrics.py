"""Segmentation metrics from one confusion matrix over the whole split.

A public contract: `confusion_matrix` and `summarize` are used by evaluation, the report
and the tests alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cascade_clip.errors import InputError


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(K, K) int64 counts, rows = ground truth, columns = prediction.

    pred and target are integer arrays or tensors of the same shape; pixels whose target is
    `ignore_index` are skipped. A target or prediction outside 0..K-1 is an error.
    """
    pred, target = _as_numpy(pred), _as_numpy(target)
    if pred.shape != target.shape:
        raise InputError(f"pred shape {pred.shape} != target shape {target.shape}")
    keep = target != ignore_index
    p = pred[keep].astype(np.int64).ravel()
    t = target[keep].astype(np.int64).ravel()
    for name, arr in (("target", t), ("pred", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise InputError(f"{name} holds class ids outside 0..{num_classes - 1}")
    return (
        np.bincount(t * num_classes + p, minlength=num_classes**2)
        .reshape(num_classes, num_classes)
        .astype(np.int64)
    )


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
    """IoU per class in [0, 1]; NaN where a class is in neither target nor prediction."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def harmonic_iou(seen: float, unseen: float) -> float:
    if np.isnan(seen) or np.isnan(unseen):
        return float("nan")
    return 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)


def summarize(
    confusion: np.ndarray, class_names: Sequence[str], unseen_names: Sequence[str]
) -> dict[str, Any]:
    """mIoU over seen and unseen classes and their harmonic mean, all in percent.

    Returns {"per_class_iou": {name: percent or NaN}, "miou": all classes, "miou_seen",
    "miou_unseen", "hiou"}. Means skip NaN classes. Unknown unseen names raise ValueError.
    """
    class_names = list(class_names)
    confusion = np.asarray(confusion)
    if confusion.shape != (len(class_names), len(class_names)):
        raise InputError(f"confusion matrix {confusion.shape} does not fit {len(class_names)} classes")
    unknown = sorted(set(unseen_names) - set(class_names))
    if unknown:
        raise InputError(f"unseen class name(s) {unknown} are not among the classes")
    iou = per_class_iou(confusion) * 100.0
    unseen = np.array([n in set(unseen_names) for n in class_names])
    miou_seen = _nanmean(iou[~unseen])
    miou_unseen = _nanmean(iou[unseen])
    return {
        "per_class_iou": {n: float(v) for n, v in zip(class_names, iou)},
        "miou": _nanmean(iou),
        "miou_seen": miou_seen,
        "miou_unseen": miou_unseen,
        "hiou": harmonic_iou(miou_seen, miou_unseen),
    }
