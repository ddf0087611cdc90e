"""Segmentation metrics from one confusion matrix over the whole split.

A public contract: `confusion_matrix` and `summarize` are used by evaluation, the report
and the tests alike.

Which classes a mean counts (the rule for classes absent from the ground truth, on which
the 459- and 847-class results of the peers differ; `ABSENT_CLASS_RULES`):

- "gt_or_pred": every class the ground truth holds or the model predicts; a class that is
  only predicted counts with IoU 0. MMSegmentation's and detectron2's evaluators. The
  primary rule: per_class_iou, miou, miou_seen, miou_unseen and hiou follow it.
- "gt_only": the classes the ground truth holds; a class that is only predicted is skipped.
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


ABSENT_CLASS_RULES = ("gt_or_pred", "gt_only")
PRIMARY_RULE = "gt_or_pred"


def per_class_iou(confusion: np.ndarray, rule: str = PRIMARY_RULE) -> np.ndarray:
    """IoU per class in [0, 1]; NaN where a class does not count under `rule` (gt_or_pred:
    in neither target nor prediction; gt_only: not in the target)."""
    if rule not in ABSENT_CLASS_RULES:
        raise InputError(f"unknown rule for absent classes {rule!r}; expected one of {ABSENT_CLASS_RULES}")
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    counted = union > 0 if rule == "gt_or_pred" else confusion.sum(1) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counted, tp / union, np.nan)


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
    "miou_unseen", "hiou"} under the primary rule for absent classes (module doc), its name
    as "absent_class_rule", and the four means under every rule as "by_absent_class_rule"
    ({rule: {"miou", "miou_seen", "miou_unseen", "hiou"}}). Means skip NaN classes. Unknown
    unseen names raise ValueError.
    """
    class_names = list(class_names)
    confusion = np.asarray(confusion)
    if confusion.shape != (len(class_names), len(class_names)):
        raise InputError(f"confusion matrix {confusion.shape} does not fit {len(class_names)} classes")
    unknown = sorted(set(unseen_names) - set(class_names))
    if unknown:
        raise InputError(f"unseen class name(s) {unknown} are not among the classes")
    unseen = np.array([n in set(unseen_names) for n in class_names])
    means = {}
    for rule in ABSENT_CLASS_RULES:
        iou = per_class_iou(confusion, rule) * 100.0
        seen_mean, unseen_mean = _nanmean(iou[~unseen]), _nanmean(iou[unseen])
        means[rule] = {"miou": _nanmean(iou), "miou_seen": seen_mean, "miou_unseen": unseen_mean,
                       "hiou": harmonic_iou(seen_mean, unseen_mean)}
    iou = per_class_iou(confusion, PRIMARY_RULE) * 100.0
    return {
        "per_class_iou": {n: float(v) for n, v in zip(class_names, iou)},
        **means[PRIMARY_RULE],
        "absent_class_rule": PRIMARY_RULE,
        "by_absent_class_rule": means,
    }
