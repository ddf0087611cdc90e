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
