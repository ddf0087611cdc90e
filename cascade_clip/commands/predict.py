"""`cascade-clip predict`."""

from __future__ import annotations

import argparse
import sys

HELP = "Open-vocabulary segmentation of your own images with any class names."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML file")


def run(args: argparse.Namespace) -> int:
    print("cascade-clip predict: not yet implemented", file=sys.stderr)
    return 1
