"""`cascade-clip train`."""

from __future__ import annotations

import argparse
import sys

HELP = "Train the cascaded decoders (inductive, transductive self-training or fully supervised)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML file")


def run(args: argparse.Namespace) -> int:
    print("cascade-clip train: not yet implemented", file=sys.stderr)
    return 1
