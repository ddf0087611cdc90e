"""Cascade-CLIP: cascaded vision-language embedding alignment for zero-shot segmentation."""

__version__ = "0.1.0"
