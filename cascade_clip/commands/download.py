"""`cascade-clip download`."""

from __future__ import annotations

import argparse
import sys

HELP = "Download a real dataset's archives (resumable, checksummed) and extract them."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML file")


def run(args: argparse.Namespace) -> int:
    print("cascade-clip download: not yet implemented", file=sys.stderr)
    return 1
