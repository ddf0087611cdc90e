"""cascade_clip.model."""
