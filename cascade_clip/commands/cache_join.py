"""`cascade-clip cache-join`."""

from __future__ import annotations

import argparse

HELP = "Join the per-shard feature caches of a split into one cache."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inputs", nargs="+", required=True, help="the shard files (all N of them)")
    parser.add_argument("--out", required=True, help="the joined index file (small HDF5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index")


def run(args: argparse.Namespace) -> int:
    from cascade_clip.cache import join_shards, open_layout

    out = join_shards(args.inputs, args.out, overwrite=args.overwrite)
    layout = open_layout(out)
    print(f"{out}: {layout.num_rows} rows in {len(layout.shard_files)} shard(s)")
    return 0
