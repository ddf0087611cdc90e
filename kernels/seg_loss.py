"""Bilinear upsampling + sigmoid focal + dice segmentation loss (DESIGN section 1).

With ``x[b, k, p]`` the logits upsampled bilinearly (``align_corners=False``) from
``(h, w)`` to the target's ``(H, W)``, one-hot targets ``t[b, k, p] = (target[b, p] == k)``
(0 at ignore pixels), ``P`` the pixels counted and ``M = max(1, #(b, k) with any t = 1)``::

    focal = sum_{b,k} mean_{p in P} FL(x, t) / M
    FL    = alpha_t * BCEWithLogits(x, t) * (1 - p_t) ** gamma
    dice  = sum_{(b,k) present} (1 - (2 sum_p p t + 1) / (sum_p p + sum_p t + 1)) / M
    loss  = focal_weight * focal + dice_weight * dice

With ``ignore_as_negative=True`` (the released behaviour) ignore pixels are in ``P`` as
negatives of every class; with ``False`` they leave ``P`` and the dice sums. A batch item
whose pixels are all ignored then contributes 0 to the focal term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import use_triton


def _check_loss(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 4 or target.dim() != 3:
        raise ValueError(
            "logits must be (B, K, h, w) and target (B, H, W), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if logits.shape[0] != target.shape[0]:
        raise ValueError(f"batch sizes differ: {logits.shape[0]} vs {target.shape[0]}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"target must be an integer tensor, got {target.dtype}")


def _num_masks(
    num_masks: float | torch.Tensor | None, present: torch.Tensor
) -> torch.Tensor:
    """``M``: the given ``num_masks`` (e.g. all-reduced across GPUs) or the local count of
    present (b, k); clamped to at least 1 either way."""
    if num_masks is None:
        m = present.sum().to(torch.float32)
    else:
        m = torch.as_tensor(num_masks, dtype=torch.float32, device=present.device).detach()
    return m.clamp(min=1.0)


def sigmoid_focal_dice_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    alpha: float = 0.25,
    gamma: float = 2.0,
    focal_weight: float = 100.0,
    dice_weight: float = 1.0,
    ignore_as_negative: bool = True,
    num_masks: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch loss: the CPU path and the test oracle. Materialises ``(B,K,H,W)``.

    Args:
        logits: ``(B, K, h, w)`` at feature resolution.
        target: ``(B, H, W)`` integer class ids, ``ignore_index`` for ignore.
        num_masks: replaces ``M`` when given (multi-GPU training passes the all-reduced
            mean); clamped to at least 1 like ``M``.

    Returns:
        The scalar loss, fp32.
    """
    _check_loss(logits, target)
    _, k, _, _ = logits.shape
    size = target.shape[-2:]
    x = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    valid = (target != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    classes = torch.arange(k, device=target.device).view(1, k, 1, 1)
    t = ((target.unsqueeze(1) == classes) & valid).float()  # (B, K, H, W)

    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    fl = alpha_t * ce * (1 - p_t) ** gamma

    if ignore_as_negative:
        in_p = torch.ones_like(valid, dtype=torch.float32)
    else:
        in_p = valid.float()
    n_p = in_p.sum(dim=(2, 3)).clamp(min=1.0)  # (B, 1)
    focal_bk = (fl * in_p).sum(dim=(2, 3)) / n_p  # (B, K)

    sum_t = t.sum(dim=(2, 3))
    sum_pt = (p * t).sum(dim=(2, 3))
    sum_p = (p * in_p).sum(dim=(2, 3))
    present = sum_t > 0
    m = _num_masks(num_masks, present)
    dice_bk = 1 - (2 * sum_pt + 1) / (sum_p + sum_t + 1)
    focal = focal_bk.sum() / m
    dice = torch.where(present, dice_bk, torch.zeros_like(dice_bk)).sum() / m
    return focal_weight * focal + dice_weight * dice


def sigmoid_focal_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    alpha: float = 0.25,
    gamma: float = 2.0,
    focal_weight: float = 100.0,
    dice_weight: float = 1.0,
    ignore_as_negative: bool = True,
    num_masks: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Upsample ``(B,K,h,w)`` logits to the ``(B,H,W)`` target and return the focal+dice
    loss (scalar, fp32). CUDA tensors run the fused Triton kernels, which never build the
    ``(B,K,H,W)`` logits; CPU tensors run :func:`sigmoid_focal_dice_loss_reference`.
    Differentiable in ``logits``."""
    _check_loss(logits, target)
    args = (ignore_index, alpha, gamma, focal_weight, dice_weight, ignore_as_negative, num_masks)
    if use_triton(logits, target):
        return sigmoid_focal_dice_loss_reference(logits, target, *args)  # Triton: next commit
    return sigmoid_focal_dice_loss_reference(logits, target, *args)
