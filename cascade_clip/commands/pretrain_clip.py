"""`cascade-clip pretrain-clip`."""

from __future__ import annotations

import argparse

from cascade_clip.config import add_config_arguments
from cascade_clip.errors import InputError

HELP = "Pre-train the shapes world's small CLIP on images and image-level captions."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="folder for checkpoint.pt and model_config.json")
    parser.add_argument("--data", help="shapes world folder (default: the config's dataset.root)")


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from cascade_clip.config import config_from_args
    from cascade_clip.pretrain import PretrainConfig, pretrain, save_clip

    cfg = config_from_args(args)
    if cfg.dataset.name != "shapes":
        raise InputError(
            f"{args.config}: pretrain-clip serves the shapes world only "
            f"(dataset.name is {cfg.dataset.name!r})"
        )
    pcfg = PretrainConfig.from_dict(cfg.extra.get("pretrain"))
    if "seed" not in (cfg.extra.get("pretrain") or {}):
        pcfg.seed = cfg.seed
    model, model_cfg, stats = pretrain(args.data or cfg.dataset.root, pcfg)
    out = save_clip(model, model_cfg, args.out, stats)
    print(
        f"small CLIP written to {out}: {stats['steps']} steps in {stats['seconds']:.0f}s, "
        f"loss {stats['loss']:.3f}, in-batch retrieval {stats['batch_accuracy']:.2f}"
    )
    return 0
