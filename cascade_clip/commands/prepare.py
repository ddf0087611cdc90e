"""`cascade-clip prepare`."""

from __future__ import annotations

import argparse
import sys

HELP = "Convert a downloaded dataset to the common format (images, train-id PNG labels, splits)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML file")


def run(args: argparse.Namespace) -> int:
    print("cascade-clip prepare: not yet implemented", file=sys.stderr)
    return 1
