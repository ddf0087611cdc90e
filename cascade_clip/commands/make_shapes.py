"""`cascade-clip make-shapes`."""

from __future__ import annotations

import argparse
from typing import Any

from cascade_clip.config import add_config_arguments
from cascade_clip.errors import InputError

HELP = "Generate the embedded 'shapes' world (images, labels, captions) from a seed."

SHAPES_KEYS = ("seed", "num_train", "num_val", "num_pretrain", "num_test", "image_size", "max_things")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", help="dataset folder to write (default: the config's dataset.root)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering images (same files)")


def shapes_settings(cfg: Any) -> dict[str, Any]:
    """The generator's keyword arguments from the config's `shapes:` section.

    `seed` defaults to the experiment seed; the unseen names recorded in dataset.json are
    `dataset.unseen` when the config sets it, else the world's default split.
    """
    section = dict(cfg.extra.get("shapes") or {})
    unknown = sorted(set(section) - set(SHAPES_KEYS))
    if unknown:
        raise InputError(f"shapes: unknown key(s) {unknown}; allowed: {list(SHAPES_KEYS)}")
    section.setdefault("seed", cfg.seed)
    if cfg.dataset.unseen is not None:
        section["unseen"] = list(cfg.dataset.unseen)
    return section


def run(args: argparse.Namespace) -> int:
    from cascade_clip.config import config_from_args
    from cascade_clip.data.shapes import generate_shapes

    cfg = config_from_args(args)
    settings = shapes_settings(cfg)
    out = args.out or cfg.dataset.root
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    root = generate_shapes(out, **settings, workers=args.workers)
    print(f"shapes world written to {root} ({settings})")
    return 0
