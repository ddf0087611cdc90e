"""`cascade-clip pretrain-clip`."""

from __future__ import annotations

import argparse
import sys

HELP = "Pre-train the shapes world's small CLIP on images and image-level captions."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML file")


def run(args: argparse.Namespace) -> int:
    print("cascade-clip pretrain-clip: not yet implemented", file=sys.stderr)
    return 1
