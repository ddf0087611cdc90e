"""Triton kernels with their PyTorch references, imported as ``cascade_clip.kernels``.

Each kernel lives in its own module beside its plain PyTorch reference (the CPU path and
the test oracle), its launch wrapper and its autograd Function. The public functions pick
Triton for CUDA tensors and the reference otherwise; ``CASCADE_CLIP_KERNELS=triton|torch``
forces either (:mod:`.dispatch`).
"""

from .dispatch import backend, interpreting, use_triton
from .nga import nga, nga_reference
from .seg_loss import sigmoid_focal_dice_loss, sigmoid_focal_dice_loss_reference
from .similarity import pixel_text_logits, pixel_text_logits_reference

__all__ = [
    "backend",
    "interpreting",
    "nga",
    "nga_reference",
    "pixel_text_logits",
    "pixel_text_logits_reference",
    "sigmoid_focal_dice_loss",
    "sigmoid_focal_dice_loss_reference",
    "use_triton",
]
