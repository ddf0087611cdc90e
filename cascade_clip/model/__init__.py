"""The Cascade-CLIP model: CLIP loading, tapped encoder, cascade head, text embeddings."""

from cascade_clip.model.cascade import CascadeCLIP
from cascade_clip.model.clip_loader import load_clip
from cascade_clip.model.encoder import TapFeatures, TappedEncoder
from cascade_clip.model.head import CascadeHead
from cascade_clip.model.text import class_embeddings, config_class_embeddings, config_templates, get_templates

__all__ = [
    "CascadeCLIP",
    "CascadeHead",
    "TapFeatures",
    "TappedEncoder",
    "class_embeddings",
    "config_class_embeddings",
    "config_templates",
    "get_templates",
    "load_clip",
]
