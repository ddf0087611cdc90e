"""`cascade-clip make-shapes`."""

from __future__ import annotations

import argparse
import sys

HELP = "Generate the embedded 'shapes' world (images, labels, captions) from a seed."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML file")


def run(args: argparse.Namespace) -> int:
    print("cascade-clip make-shapes: not yet implemented", file=sys.stderr)
    return 1
