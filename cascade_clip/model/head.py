"""The Cascade-CLIP head: in-stage fusion (NGA), relationship descriptor, one decoder per
stage, summed pixel-text similarity maps (docs/design.md: The model); and the head's
parameters as the authors' release counts them (Table 7's "40.5 M").

Shapes used throughout: L tapped blocks, S stages, B images, N = h*w pixel tokens,
C = CLIP embedding width (512 for ViT-B/16), D = decoder width, K classes, H heads.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cascade_clip.config import ModelConfig
from cascade_clip.errors import InputError
from cascade_clip.kernels.nga import nga
from cascade_clip.kernels.similarity import pixel_text_logits


def nga_init(num_blocks: int, sigma: float) -> torch.Tensor:
    """Gaussian weights by distance from the stage's deepest block: 3 blocks, sigma 1 ->
    (0.135, 0.607, 1.0). Unnormalised, as in the paper."""
    d = torch.arange(num_blocks - 1, -1, -1, dtype=torch.float32)
    return torch.exp(-0.5 * (d / sigma) ** 2)


class StageFusion(nn.Module):
    """Fuse one stage's tapped blocks (n, B, N, C) into one map (B, N, C).

    nga: unnormalised Gaussian-initialised weights (fused kernel), learnable or fixed;
    sum: plain sum, or with `learnable` per-block weights initialised to 1 (the paper's
    Table 8 "sum†"); concat: channel concat + Linear; attention: per-pixel softmax over blocks.
    A one-block stage is passed through unchanged whatever the mode.
    """

    def __init__(self, num_blocks: int, dim: int, mode: str, sigma: float, learnable: bool):
        super().__init__()
        if mode not in ("nga", "sum", "concat", "attention"):
            raise InputError(f"unknown fusion {mode!r}; expected nga, sum, concat or attention")
        self.mode = mode if num_blocks > 1 else "identity"
        self.num_blocks = num_blocks
        if self.mode == "nga":
            self.weights = nn.Parameter(nga_init(num_blocks, sigma), requires_grad=learnable)
        elif self.mode == "sum" and learnable:
            self.mode = "weighted_sum"
            self.weights = nn.Parameter(torch.ones(num_blocks))
        elif self.mode == "concat":
            self.proj = nn.Linear(num_blocks * dim, dim)
        elif self.mode == "attention":
            self.score = nn.Linear(dim, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.mode == "identity":
            return feats[0]
        if self.mode in ("nga", "weighted_sum"):
            return nga(feats, self.weights.to(feats.dtype))
        if self.mode == "sum":
            return feats.sum(0)
        if self.mode == "concat":
            return self.proj(torch.cat(list(feats), dim=-1))
        weights = self.score(feats).softmax(dim=0)  # (n, B, N, 1)
        return (weights * feats).sum(0)


class DecoderLayer(nn.Module):
    """Post-norm layer: queries (classes) cross-attend to pixel tokens, then an FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(queries, pixels, pixels, need_weights=False)  # (B, K, D)
        queries = self.norm1(queries + self.dropout(out))
        return self.norm2(queries + self.dropout(self.ffn(queries)))


class StageDecoder(nn.Module):
    """`layers` decoder layers over one stage's pixel tokens.

    The stage's mask logits are the last layer's pre-softmax attention logits averaged over
    heads, q k^T / (H sqrt(d_h)). Only that layer's q and k projections reach the output,
    so the last layer is just those two projections (its value path and FFN would be dead
    weights, and dead weights break DDP's gradient bookkeeping).
    """

    def __init__(
        self, dim: int, heads: int, layers: int, ffn_dim: int, dropout: float, input_adapter: bool = False
    ):
        super().__init__()
        if dim % heads:
            raise InputError(f"decoder width {dim} is not divisible by {heads} heads")
        # The authors' decoder reads the fused, L2-normalised CLIP tokens as they are; the
        # adapter (Linear + LayerNorm) is this project's option (model.decoder.input_adapter).
        self.input_adapter = (
            nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim)) if input_adapter else nn.Identity()
        )
        self.layers = nn.ModuleList([DecoderLayer(dim, heads, ffn_dim, dropout) for _ in range(layers - 1)])
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.heads = heads
        self.ffn_dim = ffn_dim
        self.scale = 1.0 / (heads * math.sqrt(dim // heads))

    def forward(self, queries: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, K, D), pixels (B, N, D) -> the last layer's projected (q, k)."""
        pixels = self.input_adapter(pixels)
        for layer in self.layers:
            queries = layer(queries, pixels)
        return self.q_proj(queries), self.k_proj(pixels)


class CascadeHead(nn.Module):
    """Everything trainable on top of the tapped encoder.

    forward(taps (L, B, N, C), global_token (B, C), text (K, C), grid (h, w)) -> (B, K, h, w)
    logits: the sum over stages of each stage decoder's pixel-text similarity map.

    `model.decoders_per_stage` (1 in the paper's model) gives every stage that many
    independent decoders, each with its own query projection, all maps summed: the
    paper's Table 7 compares the last layer and multi-layer fusion with the cascade at the
    cascade's parameter count, which three decoders on one stage reproduce exactly.
    Decoder d of stage s is `decoders[s * decoders_per_stage + d]`.
    """

    def __init__(self, cfg: ModelConfig, embed_dim: int):
        super().__init__()
        dec = cfg.decoder
        width = embed_dim  # decoder width = CLIP embedding width (512 for ViT-B/16)
        # With cascade off, one decoder sees every tapped block fused ("multi-layer fusion").
        self.stage_sizes = [len(s) for s in cfg.stages] if cfg.cascade else [sum(map(len, cfg.stages))]
        learnable = cfg.sum_learnable if cfg.fusion == "sum" else cfg.nga_learnable
        self.fusions = nn.ModuleList(
            [StageFusion(n, embed_dim, cfg.fusion, cfg.nga_sigma, learnable) for n in self.stage_sizes]
        )
        if cfg.decoders_per_stage < 1:
            raise InputError(f"decoders_per_stage must be >= 1, got {cfg.decoders_per_stage}")
        self.per_stage = cfg.decoders_per_stage
        num_decoders = len(self.stage_sizes) * self.per_stage
        self.relationship_descriptor = cfg.relationship_descriptor
        in_dim = 2 * embed_dim if cfg.relationship_descriptor else embed_dim
        num_proj = num_decoders if cfg.query_projection == "independent" else 1
        if cfg.query_projection not in ("independent", "shared"):
            raise InputError(f"query_projection must be independent or shared, got {cfg.query_projection!r}")
        self.query_projs = nn.ModuleList([nn.Linear(in_dim, width) for _ in range(num_proj)])
        self.decoders = nn.ModuleList(
            [
                StageDecoder(width, dec.heads, dec.layers, dec.ffn_dim, dec.dropout, dec.input_adapter)
                for _ in range(num_decoders)
            ]
        )
        self.scale = self.decoders[0].scale

    def descriptor(self, text: torch.Tensor, global_token: torch.Tensor) -> torch.Tensor:
        """text (K, C) or (B, K, C), global (B, C) -> r (B, K, 2C) = [t * g, t], or t."""
        if text.dim() == 2:
            text = text.unsqueeze(0).expand(global_token.shape[0], -1, -1)
        if not self.relationship_descriptor:
            return text
        return torch.cat([text * global_token.unsqueeze(1), text], dim=-1)

    def forward(
        self,
        taps: torch.Tensor,
        global_token: torch.Tensor,
        text: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        expected = sum(self.stage_sizes)
        if taps.shape[0] != expected:
            raise InputError(f"expected {expected} tapped blocks, got {taps.shape[0]}")
        if text.shape[-2] == 0:
            raise InputError("no classes to segment (empty text embeddings)")
        dtype = self.query_projs[0].weight.dtype
        taps, global_token, text = taps.to(dtype), global_token.to(dtype), text.to(dtype)
        r = self.descriptor(text, global_token)
        qs, ks, start = [], [], 0
        for s, n in enumerate(self.stage_sizes):
            pixels = self.fusions[s](taps[start : start + n])  # (B, N, C)
            start += n
            for d in range(s * self.per_stage, (s + 1) * self.per_stage):
                queries = self.query_projs[d % len(self.query_projs)](r)  # (B, K, D)
                q, k = self.decoders[d](queries, pixels)
                qs.append(q)
                ks.append(k)
        # One fused call: scale * sum_s q_s k_s^T -> (B, K, N), fp32.
        logits = pixel_text_logits(torch.stack(ks), torch.stack(qs), self.scale)
        b, k_cls, _ = logits.shape
        return logits.view(b, k_cls, grid[0], grid[1])


def release_parameters(model: nn.Module) -> int:
    """Trainable parameters of `model` (a CascadeCLIP) as the release counts them.

    The paper's "Params" (Table 7: 40.5 M) is the release's `get_flops.py` count: every
    tensor with requires_grad. The release builds each decoder from
    `nn.TransformerDecoderLayer`s, so beside what this project's decoder has it allocates
    (and never uses) in every layer a self-attention (4C^2 + 4C) and norm1 (2C), and in the
    last layer, of which only q and k reach the output, the value and output projections
    (2C^2 + 2C), the FFN (2CF + C + F) and two norms (4C). The decoder input adapter (this
    project's option) is not in the release. For the paper's model this gives 40,463,622
    (40.5 M) against this project's 23,117,574 live parameters."""
    ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
    unused = 0
    for module in model.modules():
        if not isinstance(module, StageDecoder):
            continue
        c = module.q_proj.in_features
        f = module.ffn_dim
        layers = len(module.layers) + 1
        unused += layers * (4 * c * c + 4 * c + 2 * c)  # self-attention, norm1
        unused += 2 * c * c + 2 * c + 2 * c * f + c + f + 4 * c  # last layer: v, proj, FFN, norms
        unused -= sum(p.numel() for p in module.input_adapter.parameters() if p.requires_grad)
    return ours + unused
