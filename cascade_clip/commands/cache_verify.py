"""`cascade-clip cache-verify`."""

from __future__ import annotations

import argparse
import json

from cascade_clip.config import add_config_arguments

HELP = "Check a feature cache: attributes, counts, shapes, dtypes, and each row's checksum and values."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--cache", required=True, help="joined index (or a single shard) to check")
    parser.add_argument("--split", default=None, help="split the cache holds (default: dataset.train_split)")
    parser.add_argument("--sample", type=int, default=None,
                        help="check the checksums and values of only this many evenly spaced rows "
                             "(default: all; the workflow's join checks a sample: each shard's own "
                             "job checked every row)")


def run(args: argparse.Namespace) -> int:
    from cascade_clip.cache import verify_cache
    from cascade_clip.config import config_from_args

    cfg = config_from_args(args)
    summary = verify_cache(args.cache, cfg, split=args.split, sample=args.sample)
    print(json.dumps(summary, indent=2))
    print(f"{args.cache}: OK")
    return 0
