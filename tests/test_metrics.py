"""Metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cascade_clip.metrics import confusion_matrix, harmonic_iou, summarize


def test_confusion_matrix_rows_are_ground_truth():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    cm = confusion_matrix(pred, target, 3)
    expected = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, expected)  # the ignored pixel (pred 0) is skipped
    np.testing.assert_array_equal(confusion_matrix(torch.tensor(pred), torch.tensor(target), 3), expected)


def test_confusion_matrix_bad_input():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(np.array([3]), np.array([0]), 3)


def test_summarize_hand_computed():
    # rows = truth. class a: tp 2, fn 1, fp 0 -> 2/3; b: tp 1, fn 0, fp 1 -> 1/2;
    # c: never in truth or prediction -> NaN; d: tp 0, fn 1, fp 0 -> 0.
    cm = np.array([[2, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    cm[3, 0] = 1  # one d pixel predicted as a: a's fp 1 -> IoU a = 2/4
    out = summarize(cm, ["a", "b", "c", "d"], unseen_names=["c", "d"])
    iou = out["per_class_iou"]
    assert iou["a"] == pytest.approx(50.0)
    assert iou["b"] == pytest.approx(50.0)
    assert math.isnan(iou["c"])
    assert iou["d"] == pytest.approx(0.0)
    assert out["miou_seen"] == pytest.approx(50.0)
    assert out["miou_unseen"] == pytest.approx(0.0)  # NaN class skipped
    assert out["hiou"] == pytest.approx(0.0)
    assert out["miou"] == pytest.approx(100 / 3)


def test_hiou():
    assert harmonic_iou(60.0, 30.0) == pytest.approx(40.0)
    assert math.isnan(harmonic_iou(60.0, float("nan")))


def test_summarize_unknown_unseen_name():
    with pytest.raises(ValueError, match=r"\['zebra'\]"):
        summarize(np.eye(2, dtype=np.int64), ["a", "b"], ["zebra"])


def test_both_rules_for_absent_classes():
    """A class only predicted (c) counts as IoU 0 under gt_or_pred (MMSegmentation,
    detectron2) and is skipped under gt_only; a class in neither (d) counts under no rule."""
    # truth: a 3 px, b 1 px; predictions: a 2, b 1, c 1 (a pixel of a predicted as c)
    cm = np.array([[2, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    out = summarize(cm, ["a", "b", "c", "d"], unseen_names=["b", "c"])
    assert out["absent_class_rule"] == "gt_or_pred"
    primary, gt_only = out["by_absent_class_rule"]["gt_or_pred"], out["by_absent_class_rule"]["gt_only"]
    assert primary["miou"] == out["miou"] == pytest.approx((200 / 3 + 100 + 0) / 3)
    assert gt_only["miou"] == pytest.approx((200 / 3 + 100) / 2)
    assert primary["miou_unseen"] == pytest.approx(50.0) and gt_only["miou_unseen"] == pytest.approx(100.0)
    assert out["per_class_iou"]["c"] == 0.0 and math.isnan(out["per_class_iou"]["d"])
    assert primary["miou_seen"] == gt_only["miou_seen"] == pytest.approx(200 / 3)
