"""Neighborhood Gaussian Aggregation (NGA): a weighted sum of a stage's tapped blocks.

``out[b, n, c] = sum_l weights[l] * features[l, b, n, c]`` (DESIGN section 1), accumulated
in fp32 and returned in the features' dtype.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton


def nga_reference(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch NGA: the CPU path and the test oracle.

    Args:
        features: ``(L, B, N, C)``, any strides, fp32/fp16/bf16.
        weights: ``(L,)``.

    Returns:
        ``(B, N, C)`` in ``features.dtype``.
    """
    _check_nga(features, weights)
    out = torch.einsum("l,lbnc->bnc", weights.float(), features.float())
    return out.to(features.dtype)


def _check_nga(features: torch.Tensor, weights: torch.Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"features must be (L, B, N, C), got {tuple(features.shape)}")
    if weights.shape != (features.shape[0],):
        raise ValueError(
            f"weights must be ({features.shape[0]},), got {tuple(weights.shape)}"
        )


def nga(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """NGA: ``sum_l weights[l] * features[l]``; ``(L, B, N, C), (L,) -> (B, N, C)``.

    CUDA tensors run the fused Triton kernel, CPU tensors :func:`nga_reference` (see
    :mod:`cascade_clip.kernels.dispatch`). Differentiable in both arguments.
    """
    _check_nga(features, weights)
    if use_triton(features, weights):
        return nga_reference(features, weights)  # Triton kernel lands in the next commit
    return nga_reference(features, weights)
