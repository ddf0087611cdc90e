"""Class text embeddings from prompt templates with CLIP's frozen text tower."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cascade_clip.config import Config
from cascade_clip.errors import InputError

# The authors' 15 templates for COCO-Stuff and PASCAL Context, in their order.
OFFICIAL_MULTI = (
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "a {} in the scene.",
    "a photo of a {} in the scene.",
    "There is a {} in the scene.",
    "There is the {} in the scene.",
    "This is a {} in the scene.",
    "This is the {} in the scene.",
    "This is one {} in the scene.",
)
# The authors' VOC template, also for VOC as a cross-dataset target: no period.
OFFICIAL_SINGLE = ("a photo of a {}",)
# This project's earlier sets (11 of its 15 are in OFFICIAL_MULTI), kept by name.
LEGACY_MULTI = (
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
LEGACY_SINGLE = ("a photo of a {}.",)

TEMPLATE_SETS = {
    "official-multi": OFFICIAL_MULTI,
    "official-single": OFFICIAL_SINGLE,
    "legacy-multi": LEGACY_MULTI,
    "legacy-single": LEGACY_SINGLE,
}
# `clip.templates: dataset` takes the dataset's own set from the registry.
DATASET_TEMPLATES = "dataset"


def template_set_name(templates: str, dataset: str) -> str:
    """The template set a config means: `templates`, or the registry's set of `dataset`
    when `templates` is "dataset"."""
    if templates != DATASET_TEMPLATES:
        return templates
    from cascade_clip.data.registry import dataset_template_set

    return dataset_template_set(dataset)


def get_templates(name: str) -> tuple[str, ...]:
    """Template set by name: official-multi (15), official-single (1), legacy-multi,
    legacy-single, or shapes (the demo world's own)."""
    if name in TEMPLATE_SETS:
        return TEMPLATE_SETS[name]
    if name == "shapes":
        from cascade_clip.data.shapes import SHAPES_TEMPLATES

        return tuple(SHAPES_TEMPLATES)
    known = [*TEMPLATE_SETS, "shapes", DATASET_TEMPLATES]
    raise InputError(f"unknown template set {name!r}; expected one of {known}")


def prompt_name(class_name: str, style: str = "raw") -> str:
    """The class name as it goes into a template: "raw" keeps the dataset's name (as the
    release: "wall-concrete"); "readable" turns "wall-concrete" / "potted_plant" into words
    and drops "-other"."""
    if style == "raw":
        return class_name
    if style == "readable":
        return class_name.replace("-other", "").replace("-", " ").replace("_", " ")
    raise InputError(f"clip.prompt_names must be 'raw' or 'readable', got {style!r}")


CUSTOM_TEMPLATES = "custom"
"""The set name of a config's own template list (`clip.templates: ["a photo of a {}."]`)."""


def config_templates(cfg: Config) -> tuple[str, tuple[str, ...]]:
    """(set name, templates) that `cfg` embeds its classes with: a named set, or the
    config's own list of templates (set name "custom")."""
    if isinstance(cfg.clip.templates, list):
        return CUSTOM_TEMPLATES, tuple(cfg.clip.templates)
    name = template_set_name(cfg.clip.templates, cfg.dataset.name)
    return name, get_templates(name)


def config_class_embeddings(
    cfg: Config,
    clip_model: torch.nn.Module,
    tokenizer: Any,
    class_names: Sequence[str],
    device: torch.device | str,
) -> torch.Tensor:
    """class_embeddings with the config's template set and class-name style."""
    _, templates = config_templates(cfg)
    return class_embeddings(clip_model, tokenizer, class_names, templates, device, cfg.clip.prompt_names)


@torch.no_grad()
def class_embeddings(
    clip_model: torch.nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    names_style: str = "raw",
) -> torch.Tensor:
    """(K, C) float32: per class, the mean of its L2-normalised prompt embeddings, re-normalised."""
    if not class_names:
        raise InputError("empty class list: nothing to embed")
    if not templates:
        raise InputError("empty template list")
    out = []
    for name in class_names:
        tokens = tokenizer([t.format(prompt_name(name, names_style)) for t in templates]).to(device)
        emb = F.normalize(encode_prompts(clip_model, tokens).float(), dim=-1)
        out.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(out)


def prompt_length(clip_model: torch.nn.Module, tokens: torch.Tensor) -> int | None:
    """How many leading token positions decide `clip_model.encode_text(tokens)`, or None
    when the text tower is not one this can tell for.

    CLIP's own text tower is causal (a position attends to itself and those before it) and
    pools the end-of-text token, the highest id (argmax pooling): the padding after the
    longest prompt's end token changes no output that is pooled. So the first L positions,
    L = that end token's position + 1, decide the embeddings. Other towers (Hugging Face
    ones, other pooling, a non-causal mask) get None.
    """
    if getattr(clip_model, "text_pool_type", None) != "argmax":
        return None
    mask = getattr(clip_model, "attn_mask", None)
    pos = getattr(clip_model, "positional_embedding", None)
    n = tokens.shape[-1]
    if not isinstance(mask, torch.Tensor) or not isinstance(pos, torch.Tensor) or tokens.dim() != 2:
        return None
    if mask.shape != (n, n) or pos.shape[0] != n:
        return None
    if not torch.equal(mask, torch.full_like(mask, float("-inf")).triu(1)):  # causal
        return None
    return int(tokens.argmax(dim=-1).max()) + 1


@torch.no_grad()
def encode_prompts(clip_model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`clip_model.encode_text(tokens)`, run on the positions that decide it (see
    `prompt_length`): "a photo of a {}." prompts end by position ~12 of the 77, so the text
    tower does a sixth of the work (COCO-Stuff's 171 x 15 prompts with ViT-B/16 on 2 CPU
    cores: ~4 min at 77 positions). The same embeddings up to float rounding; encode_text as
    it is when the tower is of another kind."""
    length = prompt_length(clip_model, tokens)
    if length is None or length >= tokens.shape[-1]:
        return clip_model.encode_text(tokens)
    pos, mask = clip_model.positional_embedding, clip_model.attn_mask
    try:
        clip_model.positional_embedding = torch.nn.Parameter(pos[:length], requires_grad=False)
        clip_model.attn_mask = mask[:length, :length]
        return clip_model.encode_text(tokens[:, :length])
    finally:
        clip_model.positional_embedding = pos
        clip_model.attn_mask = mask
