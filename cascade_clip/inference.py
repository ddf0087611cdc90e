"""Inference: sigmoid scores, seen-class calibration, sliding window, argmax (docs/design.md: The model)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def calibrate(scores: torch.Tensor, seen_ids: Sequence[int], amount: float) -> torch.Tensor:
    """Subtract `amount` from the seen classes' channels of (B, K, ...) scores.

    In the inductive setting the decoders have only ever been rewarded for seen classes,
    so their scores run high; lowering them lets unseen classes win where they should.
    """
    if amount == 0 or len(seen_ids) == 0:
        return scores
    out = scores.clone()
    out[:, list(seen_ids)] -= amount
    return out


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window origins along one axis so windows of `crop` cover 0..size with `stride` steps."""
    if size <= crop:
        return [0]
    n = (size - crop + stride - 1) // stride + 1
    return sorted({min(i * stride, size - crop) for i in range(n)})


@torch.no_grad()
def sliding_window_scores(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    num_classes: int,
    crop: int = 512,
    stride: int = 426,
) -> torch.Tensor:
    """Average sigmoid scores of overlapping crop x crop windows.

    logits_fn maps (b, 3, crop, crop) normalised images to (b, K, h, w) logits. An image
    smaller than the crop is zero-padded (zero = the mean after normalisation) and the
    padding is cut from the scores. Returns (B, K, H, W) scores in [0, 1].
    """
    b, _, h, w = image.shape
    scores = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for y in window_starts(h, crop, stride):
        for x in window_starts(w, crop, stride):
            window = image[:, :, y : y + crop, x : x + crop]
            wh, ww = window.shape[-2:]
            if (wh, ww) != (crop, crop):
                window = F.pad(window, (0, crop - ww, 0, crop - wh))
            logits = logits_fn(window).float()
            up = F.interpolate(logits, size=(crop, crop), mode="bilinear", align_corners=False)
            scores[:, :, y : y + wh, x : x + ww] += up[:, :, :wh, :ww].sigmoid()
            count[:, :, y : y + wh, x : x + ww] += 1
    return scores / count


def class_scores(scores: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, Q, H, W) prompt scores -> (B, K, H, W) class scores, each class the maximum over its
    prompts' channels (`groups[k]`); with one prompt per class, `scores` itself."""
    if all(len(g) == 1 for g in groups) and [g[0] for g in groups] == list(range(scores.shape[1])):
        return scores
    return torch.stack([scores[:, list(g)].amax(dim=1) for g in groups], dim=1)


def predict_labels(scores: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """(B, K, H, W) scores -> (B, H0, W0) int64 class ids at the original image size."""
    if scores.shape[-2:] != tuple(out_size):
        scores = F.interpolate(scores, size=out_size, mode="bilinear", align_corners=False)
    return scores.argmax(dim=1)
