"""What each block of the small shapes CLIP knows, zero-shot (issue 15's investigation).

For every block b of the frozen vision tower, the patch tokens after block b go through
CLIP's own ln_post/proj (`model.tap_projection: clip`, the demo's setting), are compared by
cosine with every class's text embedding, and the argmax is scored as frozen CLIP's dense
baseline scores the last block: mIoU seen / unseen / hIoU over the chosen split. A block
whose tokens already match the text of unseen classes can hand the cascade something the
last block lacks; a block near chance can only help through what the decoders learn on seen
classes. Also prints, per block, how well the block's tokens match the last block's
(mean cosine), to see how far each is from the space the text was aligned with.

Reads a world and a pre-trained CLIP as the demo workflow leaves them:

    python benchmarks/shapes_blocks.py --work /path/to/clone          # val split
    python benchmarks/shapes_blocks.py --work DIR --split test --config config/config.yaml

Uses `val` by default: this is a tuning tool, and `test` holds the reported numbers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cascade_clip.classes import config_unseen_names
from cascade_clip.config import Config, load_config
from cascade_clip.data import SegmentationDataset, load_classes
from cascade_clip.data.transforms import eval_transform
from cascade_clip.metrics import confusion_matrix, summarize
from cascade_clip.model import load_clip
from cascade_clip.model.encoder import TappedEncoder
from cascade_clip.text_cache import text_embeddings

ROOT = Path(__file__).resolve().parents[1]


def block_confusions(
    cfg: Config, split: str, limit: int | None = None
) -> tuple[list[np.ndarray], list[float], list[str]]:
    """Per block: the (K, K) confusion of the block's zero-shot argmax, and the mean cosine
    between its projected tokens and the last block's; plus the class names."""
    names = tuple(load_classes(cfg.dataset.root))
    clip, tokenizer = load_clip(cfg.clip)
    depth = len(clip.visual.transformer.resblocks)
    encoder = TappedEncoder(clip.visual, list(range(1, depth + 1)), tap_projection="clip",
                            cls_token=cfg.model.cls_token).eval()
    text = F.normalize(text_embeddings(cfg, names, None, clip, tokenizer, torch.device("cpu")), dim=-1)
    transform = eval_transform(cfg.evaluate.short_side)
    data = SegmentationDataset(cfg.dataset.root, split, mode="eval", transform=transform)
    k = len(names)
    confusions = [np.zeros((k, k), np.int64) for _ in range(depth)]
    agreement = np.zeros(depth)
    count = len(data) if limit is None else min(limit, len(data))
    with torch.no_grad():
        for i in range(count):
            item = data[i]
            image, label = item["image"][None], item["label"].long()
            feats = encoder(image)  # taps (depth, 1, N, C), L2-normalised
            h, w = feats.grid
            for b in range(depth):
                cos = torch.einsum("nc,kc->kn", feats.taps[b, 0], text).reshape(1, k, h, w)
                pred = F.interpolate(cos, size=label.shape, mode="bilinear", align_corners=False)[0].argmax(0)
                confusions[b] += confusion_matrix(pred, label, k)
                agreement[b] += float((feats.taps[b, 0] * feats.taps[-1, 0]).sum(-1).mean())
    return confusions, list(agreement / max(count, 1)), list(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="folder the demo workflow ran in (resources/, config/)")
    parser.add_argument("--config", default=None, help="default: WORK/config/config.yaml")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    os.chdir(work)  # the config's resource paths are relative to the workflow folder
    cfg = load_config(args.config or work / "config" / "config.yaml")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    confusions, agreement, names = block_confusions(cfg, args.split, args.limit)
    unseen = config_unseen_names(cfg)
    print(f"zero-shot per block, {args.split} split, unseen {unseen}")
    print("block  seen  unseen  hIoU  cos(last)")
    for b, (conf, agree) in enumerate(zip(confusions, agreement), start=1):
        m = summarize(conf, names, unseen)
        print(f"{b:5d}  {m['miou_seen']:4.1f}  {m['miou_unseen']:6.1f}  {m['hiou']:4.1f}  {agree:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
