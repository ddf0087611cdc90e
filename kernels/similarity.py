"""Pixel-text similarity summed over the cascade's stages.

``out[b, k, n] = scale * sum_s sum_d queries[s, b, k, d] * pixels[s, b, n, d]``: with
``scale = 1 / (H sqrt(d_h))`` this is every stage's head-averaged attention logit map,
summed (DESIGN section 1). Accumulated and returned in fp32.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton


def _check_similarity(pixels: torch.Tensor, queries: torch.Tensor) -> None:
    if pixels.dim() != 4 or queries.dim() != 4:
        raise ValueError(
            "pixels must be (S, B, N, D) and queries (S, B, K, D), got "
            f"{tuple(pixels.shape)} and {tuple(queries.shape)}"
        )
    s, b, _, d = pixels.shape
    if (queries.shape[0], queries.shape[1], queries.shape[3]) != (s, b, d):
        raise ValueError(
            f"pixels {tuple(pixels.shape)} and queries {tuple(queries.shape)} disagree on S, B, D"
        )


def pixel_text_logits_reference(
    pixels: torch.Tensor, queries: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain PyTorch pixel-text logits: the CPU path and the test oracle.

    Args:
        pixels: ``(S, B, N, D)``.
        queries: ``(S, B, K, D)``.
        scale: multiplies the result.

    Returns:
        ``(B, K, N)`` fp32.
    """
    _check_similarity(pixels, queries)
    out = torch.einsum("sbkd,sbnd->bkn", queries.float(), pixels.float())
    return out * scale


def pixel_text_logits(pixels: torch.Tensor, queries: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * sum_s queries[s] @ pixels[s]^T``: ``(S,B,N,D), (S,B,K,D) -> (B,K,N)`` fp32.

    CUDA tensors run the Triton kernel, CPU tensors the reference. Differentiable in
    ``pixels`` and ``queries``.
    """
    _check_similarity(pixels, queries)
    if use_triton(pixels, queries):
        return pixel_text_logits_reference(pixels, queries, scale)  # Triton: next commit
    return pixel_text_logits_reference(pixels, queries, scale)
