"""The frozen CLIP image encoder, tapped at several blocks (docs/design.md: The model).

`TappedEncoder` runs an open_clip `VisionTransformer` block by block and returns, for
every tapped block, its patch tokens projected to the joint embedding and L2-normalised,
plus the image's global token. In `vpt` mode it inserts learned deep prompt tokens before
every block and, as the authors' release, normalises every tapped hidden state and the
last block's output with one trainable LayerNorm (`prompt_norm`); these are the only
trainable parameters. In `frozen` mode it has none, so its output can be cached once
(cascade_clip.cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cascade_clip.errors import InputError


@dataclass
class TapFeatures:
    """taps: (L, B, N, C) projected, L2-normalised patch tokens of the tapped blocks, in
    the order given to the encoder; global_token: (B, C) L2-normalised; grid: (h, w), h*w = N.
    """

    taps: torch.Tensor
    global_token: torch.Tensor
    grid: tuple[int, int]


class TapProjection(nn.Module):
    """LayerNorm + linear projection width -> embed_dim for one intermediate block.

    The official release projects blocks 6..11 with a *fixed, seeded random* LayerNorm and
    projection that is never trained; both are buffers here so no optimiser sees them.
    """

    def __init__(self, width: int, embed_dim: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("ln_weight", torch.ones(width))
        self.register_buffer("ln_bias", torch.zeros(width))
        self.register_buffer("proj", torch.randn(width, embed_dim, generator=gen) * width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, W) -> (B, N, C)
        x = F.layer_norm(tokens, tokens.shape[-1:], self.ln_weight, self.ln_bias)
        return x @ self.proj.to(x.dtype)


class DeepPrompts(nn.Module):
    """Deep visual prompt tuning (as in ZegCLIP): `num_tokens` learned tokens per block,
    passed through one shared `prompt_proj`, replacing the previous block's prompts."""

    def __init__(self, depth: int, num_tokens: int, width: int, patch_size: int, dropout: float = 0.1):
        super().__init__()
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + width))
        self.tokens = nn.Parameter(torch.empty(depth, num_tokens, width).uniform_(-bound, bound))
        self.prompt_proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.dropout = nn.Dropout(dropout)
        self.num_tokens = num_tokens

    def forward(self, block: int, batch: int) -> torch.Tensor:  # -> (B, T, W)
        return self.dropout(self.prompt_proj(self.tokens[block])).expand(batch, -1, -1)


class TappedEncoder(nn.Module):
    """Wraps `clip_model.visual` (an open_clip VisionTransformer, kept frozen).

    Args:
        visual: the open_clip vision tower (its positional embedding already fits the input).
        blocks: 1-based block numbers to tap, in output order.
        tap_projection: "random" (seeded, fixed) or "clip" (reuse ln_post/proj) for blocks
            before the last; the last block always uses CLIP's own ln_post/proj.
        mode: "frozen" or "vpt".
        cls_token: "standard" (CLIP's CLS input: class_embedding + pos[0]) or "official"
            (2 x class_embedding + pos[0], as the authors' encoder adds it twice).
        prompt_norm: vpt only; a trainable LayerNorm (eps 1e-6) applied to each tapped
            hidden state before its projection and to the last block's output before
            ln_post/proj, as in the authors' encoder.
    """

    def __init__(
        self,
        visual: nn.Module,
        blocks: list[int],
        tap_projection: str = "random",
        tap_seed: int = 0,
        mode: str = "frozen",
        vpt_tokens: int = 50,
        cls_token: str = "standard",
        prompt_norm: bool = False,
    ):
        super().__init__()
        self.visual = visual
        self.depth = len(visual.transformer.resblocks)
        bad = [b for b in blocks if not 1 <= b <= self.depth]
        if bad:
            raise InputError(f"tapped block(s) {bad} outside the encoder's 1..{self.depth} blocks")
        if tap_projection not in ("random", "clip"):
            raise InputError(f"tap_projection must be 'random' or 'clip', got {tap_projection!r}")
        if mode not in ("frozen", "vpt"):
            raise InputError(f"encoder mode must be 'frozen' or 'vpt', got {mode!r}")
        if cls_token not in ("standard", "official"):
            raise InputError(f"cls_token must be 'standard' or 'official', got {cls_token!r}")
        if visual.proj is None:
            raise InputError("the vision tower has no output projection (proj); cannot tap it")
        self.blocks = list(blocks)
        self.mode = mode
        self.cls_scale = 2.0 if cls_token == "official" else 1.0
        self.width = visual.conv1.out_channels
        self.embed_dim = visual.proj.shape[1]
        self.patch_size = visual.conv1.kernel_size[0]
        for p in self.visual.parameters():
            p.requires_grad_(False)
        # One projection per intermediate tap; None means "CLIP's own ln_post/proj".
        self.projections = nn.ModuleDict(
            {
                str(b): TapProjection(self.width, self.embed_dim, seed=tap_seed * 1000 + b)
                for b in self.blocks
                if b != self.depth and tap_projection == "random"
            }
        )
        self.prompts = (
            DeepPrompts(self.depth, vpt_tokens, self.width, self.patch_size) if mode == "vpt" else None
        )
        self.prompt_norm = nn.LayerNorm(self.width, eps=1e-6) if mode == "vpt" and prompt_norm else None

    def train(self, mode: bool = True) -> TappedEncoder:
        super().train(mode)
        self.visual.eval()  # frozen CLIP never uses dropout / patch dropout
        return self

    def _project(self, block: int, tokens: torch.Tensor) -> torch.Tensor:
        if str(block) in self.projections:
            x = self.projections[str(block)](tokens)
        else:
            x = self.visual.ln_post(tokens) @ self.visual.proj
        return F.normalize(x, dim=-1)

    def _norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """prompt_norm (vpt) on hidden states; a per-token LayerNorm, so applying it to the
        patch tokens alone equals the release's whole-sequence call."""
        return tokens if self.prompt_norm is None else self.prompt_norm(tokens)

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))  # (B, W, h, w)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, N, W)
        cls = (self.cls_scale * v.class_embedding).to(x.dtype).expand(x.shape[0], 1, -1)
        pos = v.positional_embedding.to(x.dtype)
        if pos.shape[0] != grid[0] * grid[1] + 1:
            raise InputError(
                f"input grid {grid} does not fit the positional embedding of {pos.shape[0] - 1} "
                f"patches (load the CLIP with image_size={grid[0] * self.patch_size})"
            )
        x = torch.cat([cls, x], dim=1) + pos
        return v.ln_pre(x), grid

    def forward(self, images: torch.Tensor) -> TapFeatures:
        """images: (B, 3, H, W) normalised -> TapFeatures with N = (H/p)*(W/p)."""
        x, grid = self._embed(images)  # (B, 1 + N, W)
        n_patch = grid[0] * grid[1]
        batch = x.shape[0]
        wanted = set(self.blocks)
        taps: dict[int, torch.Tensor] = {}
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        for i, block in enumerate(self.visual.transformer.resblocks):
            if self.prompts is not None:
                # [CLS | prompts_i | patches]: the previous block's prompts are replaced.
                patches = x[:, -n_patch:]
                x = torch.cat([x[:, :1], self.prompts(i, batch).to(x.dtype), patches], dim=1)
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
            if i + 1 in wanted:
                taps[i + 1] = self._project(i + 1, self._norm(x[:, -n_patch:]))
        global_token = F.normalize(self.visual.ln_post(self._norm(x[:, 0])) @ self.visual.proj, dim=-1)
        stacked = torch.stack([taps[b] for b in self.blocks])  # (L, B, N, C)
        return TapFeatures(taps=stacked, global_token=global_token, grid=grid)
