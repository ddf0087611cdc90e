"""`cascade-clip import-official`."""

from __future__ import annotations

import argparse

from cascade_clip.config import add_config_arguments

HELP = "Convert a checkpoint of the authors' release (MMSegmentation .pth) for evaluate and predict."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True, metavar="IN.pth", help="the release's checkpoint")
    parser.add_argument("--out", required=True, metavar="OUT.pt", help="project checkpoint to write")
    parser.add_argument(
        "--setting",
        choices=("inductive", "transductive", "fully_supervised"),
        help="what the released model was trained as (default: the config's train.setting); "
        "evaluate applies the seen calibration to inductive models only",
    )
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="read the file with full pickle loading (only for a file you trust)",
    )


def run(args: argparse.Namespace) -> int:
    from cascade_clip.config import config_from_args
    from cascade_clip.official import import_official

    cfg = config_from_args(args)
    out = import_official(cfg, args.checkpoint, args.out, args.setting, args.unsafe_load)
    print(f"{out}: converted {args.checkpoint} for {args.config}")
    return 0
