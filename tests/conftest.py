"""Shared test setup.

Triton reads TRITON_INTERPRET when its kernels are defined, so it is set here, before any
test module imports cascade_clip.kernels: without a GPU the kernel tests run in Triton's
interpreter on CPU tensors; on a GPU machine they run compiled.
"""

from __future__ import annotations

import os

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402

from cascade_clip.testing import tiny_clip_config as _tiny


@pytest.fixture
def tiny_clip_config() -> dict:
    return _tiny()


@pytest.fixture
def tiny_model_config():
    """A two-stage cascade over the tiny CLIP's blocks 2..4."""
    from cascade_clip.config import DecoderConfig, ModelConfig

    return ModelConfig(
        stages=[[2, 3], [4]],
        decoder=DecoderConfig(layers=2, heads=2, ffn_dim=64, dropout=0.0),
        vpt_tokens=3,
    )
