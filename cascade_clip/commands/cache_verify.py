"""`cascade-clip cache-verify`."""

from __future__ import annotations

import argparse
import sys

HELP = "Check a feature cache: counts, shapes, dtypes, finiteness and attributes."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML file")


def run(args: argparse.Namespace) -> int:
    print("cascade-clip cache-verify: not yet implemented", file=sys.stderr)
    return 1
