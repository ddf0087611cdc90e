"""`cascade-clip cache-features`."""

from __future__ import annotations

import argparse
import sys

HELP = "Cache the frozen encoder's tapped block features for one shard of a split (HDF5)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML file")


def run(args: argparse.Namespace) -> int:
    print("cascade-clip cache-features: not yet implemented", file=sys.stderr)
    return 1
