"""Tiny models for tests and smoke runs: real open_clip code paths, CPU-sized."""

from __future__ import annotations

import copy

# A tiny open_clip CLIP: 4 ViT blocks, 32x32 input, 8x8 patches -> 4x4 grid, 32-d embedding.
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 48, "layers": 4, "head_width": 24},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip_config() -> dict:
    """A fresh copy of TINY_CLIP_CONFIG (callers may edit it)."""
    return copy.deepcopy(TINY_CLIP_CONFIG)
