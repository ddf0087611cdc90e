"""Shared test setup.

Triton reads TRITON_INTERPRET when its kernels are defined, so it is set here, before any
test module imports cascade_clip.kernels: without a GPU the kernel tests run in Triton's
interpreter on CPU tensors.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
