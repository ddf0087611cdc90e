"""`cascade-clip report`."""

from __future__ import annotations

import argparse
import sys

HELP = "Collect metrics, curves and examples into the report's tables and figures."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML file")


def run(args: argparse.Namespace) -> int:
    print("cascade-clip report: not yet implemented", file=sys.stderr)
    return 1
