"""`cascade-clip cache-features`."""

from __future__ import annotations

import argparse

from cascade_clip.config import add_config_arguments

HELP = ("Cache the frozen encoder's tapped block features for one shard of a split (HDF5); every row is "
        "read back and checked before the shard is renamed into place.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--split", default="train", help="split to cache (only the training split is)")
    parser.add_argument("--shard", default="0/1", metavar="I/N", help="shard I (0-based) of N (default 0/1)")
    parser.add_argument("--out", required=True, help="output HDF5 file of this shard")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=None,
                        help="image decoding workers (default: train.num_workers)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing complete cache made with another config")
    parser.add_argument("--no-space-check", action="store_true",
                        help="start even if the output's file system seems too small for the shard")


def run(args: argparse.Namespace) -> int:
    from cascade_clip.cache import parse_shard, write_shard
    from cascade_clip.config import config_from_args
    from cascade_clip.distributed import loader_workers

    cfg = config_from_args(args)
    shard = parse_shard(args.shard)
    if not args.no_space_check:  # refuse before writing anything (cascade_clip.plan)
        from cascade_clip.plan.sizes import check_cache_space

        check_cache_space(cfg, args.split, shard, args.out, overwrite=args.overwrite)
    workers = loader_workers(cfg.train.num_workers if args.workers is None else args.workers)
    write_shard(
        cfg, args.split, shard, args.out, device=args.device, workers=workers, overwrite=args.overwrite
    )
    return 0
