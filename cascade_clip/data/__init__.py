"""cascade_clip.data."""
