"""CascadeCLIP: the tapped frozen encoder plus the cascade head."""

from __future__ import annotations

import torch
from torch import nn

from cascade_clip.config import ModelConfig
from cascade_clip.errors import InputError
from cascade_clip.model.encoder import TapFeatures, TappedEncoder
from cascade_clip.model.head import CascadeHead


class CascadeCLIP(nn.Module):
    """images (B, 3, H, W) + class text embeddings (K, C) -> logits (B, K, H/p, W/p).

    Only the head (and, in `vpt` mode, the prompt tokens) train. The text tower is not part
    of this module: class embeddings are computed once (cascade_clip.model.text) and cached.
    """

    def __init__(self, clip_model: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = TappedEncoder(
            clip_model.visual,
            blocks=self.tapped_blocks(cfg),
            tap_projection=cfg.tap_projection,
            tap_seed=cfg.tap_seed,
            mode=cfg.encoder_mode,
            vpt_tokens=cfg.vpt_tokens,
            cls_token=cfg.cls_token,
            prompt_norm=cfg.vpt_prompt_norm,
        )
        self.head = CascadeHead(cfg, self.encoder.embed_dim)

    @staticmethod
    def tapped_blocks(cfg: ModelConfig) -> list[int]:
        return [b for stage in cfg.stages for b in stage]

    def encode(self, images: torch.Tensor) -> TapFeatures:
        return self.encoder(images)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(images)
        return self.head(feats.taps, feats.global_token, text, feats.grid)

    def forward_features(self, feats: TapFeatures, text: torch.Tensor) -> torch.Tensor:
        """The head alone, from (cached) tap features."""
        return self.head(feats.taps, feats.global_token, text, feats.grid)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: everything but the frozen CLIP weights."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.visual.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise InputError(
                f"checkpoint does not fit this model config: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}"
            )
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise InputError(
                    f"checkpoint tensor {k} has shape {tuple(v.shape)}, model wants {tuple(own[k].shape)}"
                )
        self.load_state_dict(state, strict=False)
