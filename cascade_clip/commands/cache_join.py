"""`cascade-clip cache-join`."""

from __future__ import annotations

import argparse
import sys

HELP = "Join the per-shard feature caches of a split into one cache."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML file")


def run(args: argparse.Namespace) -> int:
    print("cascade-clip cache-join: not yet implemented", file=sys.stderr)
    return 1
