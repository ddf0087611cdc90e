"""`cascade-clip evaluate`."""

from __future__ import annotations

import argparse
import sys

HELP = "Evaluate a checkpoint: sliding-window inference, mIoU seen/unseen, hIoU."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML file")


def run(args: argparse.Namespace) -> int:
    print("cascade-clip evaluate: not yet implemented", file=sys.stderr)
    return 1
