"""One optimisation step's pieces: learning rate, label subsampling, mask count, pseudo-labels,
and the module DDP wraps (images or cached taps -> logits), compiled when asked.

Shapes: B batch per process, K queries, L tapped blocks, N = h*w tokens, C embedding width,
(H, W) label size (the crop).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cascade_clip.cache.encoding import decode
from cascade_clip.data import IGNORE_INDEX, UNSEEN_INDEX
from cascade_clip.errors import InputError
from cascade_clip.model import CascadeCLIP, TapFeatures


def learning_rate(step: int, base_lr: float, iters: int, warmup: int, power: float, min_lr: float) -> float:
    """lr for optimisation step `step` (0-based): poly decay from base_lr to min_lr over
    `iters`, multiplied by a linear warm-up factor (step+1)/warmup for the first steps."""
    progress = min(step, iters) / max(iters, 1)
    lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    if step < warmup:
        lr *= (step + 1) / warmup
    return lr


def count_masks(target: torch.Tensor, num_queries: int) -> torch.Tensor:
    """target (B, H, W) query ids / 255 -> number of (b, k) with a pixel of class k (fp32 scalar)."""
    b = target.shape[0]
    ids = target.reshape(b, -1).clamp(max=num_queries)  # everything >= K lands in bin K
    present = torch.zeros(b, num_queries + 1, device=target.device)
    present.scatter_(1, ids, 1.0)
    return present[:, :num_queries].sum()


def subsample_labels(labels: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, H, W) -> (B, ceil(H/stride), ceil(W/stride)): every `stride`-th label per axis,
    starting at the middle of the first cell (stride 1 returns `labels` itself)."""
    if stride == 1:
        return labels
    first = stride // 2
    return labels[:, first::stride, first::stride]


@torch.no_grad()
def pseudo_label(logits: torch.Tensor, target: torch.Tensor, unseen_queries: list[int]) -> torch.Tensor:
    """Self-training targets: pixels marked 254 get the argmax over the UNSEEN queries of
    the current prediction; every other pixel keeps its label.

    logits (B, K, h, w) (detached here), target (B, H, W) -> (B, H, W) int64.
    """
    marked = target == UNSEEN_INDEX
    if not marked.any():
        return target
    if not unseen_queries:
        return target.masked_fill(marked, IGNORE_INDEX)
    idx = torch.tensor(unseen_queries, device=logits.device)
    scores = logits.detach().float().index_select(1, idx)
    scores = F.interpolate(scores, size=target.shape[-2:], mode="bilinear", align_corners=False)
    pseudo = idx[scores.argmax(dim=1)]  # (B, H, W) query ids
    return torch.where(marked, pseudo, target)


class TrainStep(nn.Module):
    """What DDP wraps: images (online encoder) or cached tap features -> logits (B, K, h, w).

    DDP hooks gradients only through `forward`, so the head-from-cache path needs a module
    whose forward takes the cached tensors.
    """

    def __init__(self, model: CascadeCLIP):
        super().__init__()
        self.model = model

    def forward(
        self,
        text: torch.Tensor,
        images: torch.Tensor | None = None,
        taps: torch.Tensor | None = None,
        global_token: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if images is not None:
            if self.model.cfg.encoder_mode == "frozen":
                with torch.no_grad():  # nothing in a frozen encoder needs a gradient
                    feats = self.model.encode(images)
            else:
                feats = self.model.encode(images)
        else:
            feats = TapFeatures(taps=taps, global_token=global_token, grid=grid or square_grid(taps.shape[2]))
        return self.model.forward_features(feats, text)


class CompiledStep:
    """The step module, compiled by `torch.compile` when `train.compile` asks for it.

    Training shapes are static (fixed crop, drop_last batches, fixed queries), so the
    forward and its backward compile once; "reduce-overhead" replays them as CUDA graphs,
    which removes the head step's per-kernel launch cost on a GPU. A step whose compiled
    call fails (a backend missing, a graph it cannot capture) falls back to the eager
    module with a one-line warning; the eager call then runs the step, so a real bug still
    raises. Evaluation never compiles: its sliding windows change shape.
    """

    def __init__(self, module: nn.Module, mode: str):
        self.eager = module
        self.compiled = None if mode == "none" else torch.compile(module, mode=mode, dynamic=False)
        self.mode = mode

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # compile-time failures come in many types
                print(f"train.compile={self.mode}: compiled step failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); continuing eagerly")
                self.compiled = None
        return self.eager(*args, **kwargs)


def square_grid(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise InputError(f"{n} cached tokens per image do not form a square grid")
    return side, side


def model_inputs(batch: dict[str, Any], device: torch.device, tap_rows: list[int] | None) -> dict[str, Any]:
    """A collated batch -> keyword arguments of TrainStep (without the text)."""
    if "taps" in batch:
        taps = batch["taps"].to(device, non_blocking=True)  # (B, L, N, C) as stored: fp16 or int8
        if tap_rows is not None:
            taps = taps[:, tap_rows]
        grid = tuple(int(v) for v in batch["grid"][0]) if "grid" in batch else None
        return {
            "taps": decode(taps).transpose(0, 1),  # (L, B, N, C) float32, decoded on the device
            "global_token": batch["global_token"].to(device, non_blocking=True).float(),
            "grid": grid,
        }
    return {"images": batch["image"].to(device, non_blocking=True)}
