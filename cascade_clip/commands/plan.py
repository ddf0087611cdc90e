"""`cascade-clip plan`."""

from __future__ import annotations

import argparse

from cascade_clip.config import add_config_arguments

HELP = ("Print what the config's workflow will download and write (archives, data, feature cache, "
        "checkpoints) and, where measured, how long it takes; reads no weights, no network.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cascade_clip.config import parse_overrides
    from cascade_clip.plan import format_plan, make_plan

    print(format_plan(make_plan(args.config, parse_overrides(args.overrides))))
    return 0
