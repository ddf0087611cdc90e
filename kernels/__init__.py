"""Triton kernels with their PyTorch references, imported as cascade_clip.kernels."""
