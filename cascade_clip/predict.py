"""Open-vocabulary segmentation of the user's own images with any class names.

For every image: the evaluation resize (short side = evaluate.short_side), sliding-window
sigmoid scores against text embeddings computed now from the given names (the config's
CLIP and template set), scores resized to the image's own size, argmax. No seen-class
calibration: the names are the user's, none of them is "seen".

Files in DIR, per image <stem> (a repeated stem gets a _2, _3, ... suffix):

  DIR/<stem>_label.png    single-channel PNG, value k = the k-th class name
  DIR/<stem>_overlay.png  the image with the colourised prediction blended in, and a legend
  DIR/classes.json        ["cat", "grass", "sky"]: the label values' names
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cascade_clip.config import Config
from cascade_clip.errors import InputError
from cascade_clip.evaluate import colorize, legend_handles, load_model, make_logits_fn, palette
from cascade_clip.inference import predict_labels, sliding_window_scores
from cascade_clip.model import config_class_embeddings


def parse_classes(text: str) -> list[str]:
    """ "cat, grass,sky" -> ["cat", "grass", "sky"]; empty, repeated or too many names are errors."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InputError(f"--classes {text!r}: no class names (give a comma-separated list)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"--classes: repeated name(s) {repeated}")
    if len(names) > 254:
        raise InputError(f"--classes: {len(names)} names; at most 254 fit a label PNG")
    return names


def save_overlay(
    path: Path, image: np.ndarray, label: np.ndarray, names: Sequence[str], alpha: float = 0.5
) -> None:
    """The image with the colourised label blended in (alpha) and a legend of the classes present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = palette(len(names))
    blend = (image.astype(np.float32) * (1 - alpha) + colorize(label, colours) * alpha).astype(np.uint8)
    h, w = label.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 6.0 * w / max(h, w)) + 2.0, 6.0 * h / max(h, w)))
    ax.imshow(blend)
    ax.axis("off")
    present = [int(v) for v in np.unique(label) if v < len(names)]
    fig.legend(handles=legend_handles(present, names, colours, set()), loc="center right", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def output_stem(image: Path, used: set[str]) -> str:
    stem, n = image.stem, 1
    while stem in used:
        n += 1
        stem = f"{image.stem}_{n}"
    used.add(stem)
    return stem


def predict(
    cfg: Config,
    checkpoint: str | Path,
    class_names: Sequence[str],
    images: Sequence[str | Path],
    out_dir: str | Path,
    device: str | None = None,
) -> list[tuple[str, str]]:
    """Segment every image into `class_names`; returns [(image, error)] for the images that
    could not be read (the others are written regardless)."""
    from cascade_clip.data.dataset import read_image
    from cascade_clip.data.transforms import eval_transform

    out_dir = Path(out_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, clip, tokenizer, _ = load_model(cfg, checkpoint, None, dev)
    text = config_class_embeddings(cfg, clip, tokenizer, list(class_names), dev)
    logits_fn = make_logits_fn(model, text.to(dev), cfg.train.amp and dev.type == "cuda", dev)
    transform = eval_transform(cfg.evaluate.short_side)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "classes.json").write_text(json.dumps(list(class_names)) + "\n")

    failures: list[tuple[str, str]] = []
    used: set[str] = set()
    for image_path in map(Path, images):
        try:
            image = read_image(image_path)  # (H, W, 3) uint8; names the file on error
        except (FileNotFoundError, ValueError) as err:
            failures.append((str(image_path), str(err)))
            continue
        x, _ = transform(image, None)
        scores = sliding_window_scores(
            logits_fn, x.unsqueeze(0).to(dev), len(class_names), cfg.evaluate.crop_size, cfg.evaluate.stride
        )
        label = predict_labels(scores, image.shape[:2])[0].cpu().numpy().astype(np.uint8)  # (H, W)
        stem = output_stem(image_path, used)
        Image.fromarray(label).save(out_dir / f"{stem}_label.png")
        save_overlay(out_dir / f"{stem}_overlay.png", image, label, class_names)
    return failures
