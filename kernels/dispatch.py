"""Choosing between a Triton kernel and its plain PyTorch reference.

Every public kernel function calls :func:`use_triton` with its tensor arguments:

- ``CASCADE_CLIP_KERNELS=triton`` forces the Triton kernel (on CPU tensors this needs
  ``TRITON_INTERPRET=1`` set before ``cascade_clip.kernels`` is imported: Triton reads it
  when the kernels are defined);
- ``CASCADE_CLIP_KERNELS=torch`` forces the PyTorch reference;
- unset, empty or ``auto``: CUDA tensors use Triton, anything else uses the reference.

The variable is read at every call, so tests can switch it with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "CASCADE_CLIP_KERNELS"
_CHOICES = ("auto", "triton", "torch")


def backend() -> str:
    """The requested backend: ``"auto"``, ``"triton"`` or ``"torch"``."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(_CHOICES)}")
    return value


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    try:
        import triton.knobs

        return bool(triton.knobs.runtime.interpret)  # Triton's own parsing of the variable
    except (ImportError, AttributeError):  # older Triton
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a kernel called with ``tensors`` should run its Triton implementation."""
    choice = backend()
    if choice == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "auto":
        return on_cuda
    if not on_cuda and not interpreting():
        raise RuntimeError(
            f"{ENV_VAR}=triton with CPU tensors needs TRITON_INTERPRET=1, set before "
            "cascade_clip.kernels is imported"
        )
    return True


POISON_VAR = "CASCADE_CLIP_KERNELS_POISON"


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer for a kernel to fill.

    With ``CASCADE_CLIP_KERNELS_POISON=1`` (read at call time; the tests set it) the
    buffer is filled with NaN first, so an element a kernel forgets to write shows up.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_VAR, "0") == "1":
        out.fill_(float("nan"))
    return out
