"""`cascade-clip text-embeddings`."""

from __future__ import annotations

import argparse
import sys

HELP = "Compute and cache the class text embeddings with the frozen text tower."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML file")


def run(args: argparse.Namespace) -> int:
    print("cascade-clip text-embeddings: not yet implemented", file=sys.stderr)
    return 1
