"""Class text embeddings from prompt templates with CLIP's frozen text tower."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# The 15-template set used for COCO-Stuff and PASCAL Context (ViLD-style scene prompts).
COCO_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of a {}.",
    "There is a {} in the scene.",
    "There is the {} in the scene.",
    "a photo of a {} in the scene.",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
    "a photo of the {}.",
)
VOC_TEMPLATES = ("a photo of a {}.",)


def get_templates(name: str) -> tuple[str, ...]:
    """Template set by name: "coco" (15), "voc" (1), "shapes" (the demo world's own)."""
    if name == "coco":
        return COCO_TEMPLATES
    if name == "voc":
        return VOC_TEMPLATES
    if name == "shapes":
        from cascade_clip.data.shapes import SHAPES_TEMPLATES

        return tuple(SHAPES_TEMPLATES)
    raise ValueError(f"unknown template set {name!r}; expected coco, voc or shapes")


def prompt_name(class_name: str) -> str:
    """Dataset names like "wall-concrete" or "potted_plant" read better as words."""
    return class_name.replace("-other", "").replace("-", " ").replace("_", " ")


@torch.no_grad()
def class_embeddings(
    clip_model: torch.nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(K, C) float32: per class, the mean of its L2-normalised prompt embeddings, re-normalised."""
    if not class_names:
        raise ValueError("empty class list: nothing to embed")
    if not templates:
        raise ValueError("empty template list")
    out = []
    for name in class_names:
        tokens = tokenizer([t.format(prompt_name(name)) for t in templates]).to(device)
        emb = F.normalize(clip_model.encode_text(tokens).float(), dim=-1)
        out.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(out)
