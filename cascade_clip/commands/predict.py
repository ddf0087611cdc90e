"""`cascade-clip predict`."""

from __future__ import annotations

import argparse
import sys

from cascade_clip.config import add_config_arguments

HELP = "Open-vocabulary segmentation of your own images with any class names."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="model_final.pt of a training run"
    )
    parser.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat,grass,sky"')
    parser.add_argument("--out", required=True, help="output directory (label PNG + overlay per image)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")


def run(args: argparse.Namespace) -> int:
    from cascade_clip.config import config_from_args
    from cascade_clip.predict import parse_classes, predict

    cfg = config_from_args(args)
    names = parse_classes(args.classes)
    failures = predict(cfg, args.checkpoint, names, args.images, args.out, device=args.device)
    for _, error in failures:
        print(f"cascade-clip predict: error: {error}", file=sys.stderr)
    done = len(args.images) - len(failures)
    print(f"cascade-clip predict: {done} of {len(args.images)} image(s) segmented -> {args.out}")
    return 1 if failures else 0
