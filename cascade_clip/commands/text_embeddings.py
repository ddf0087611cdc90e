"""`cascade-clip text-embeddings`."""

from __future__ import annotations

import argparse

from cascade_clip.config import add_config_arguments

HELP = "Compute and cache the class text embeddings with the frozen text tower."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="output HDF5 file")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    from cascade_clip.config import config_from_args
    from cascade_clip.model import config_templates
    from cascade_clip.text_cache import compute_text_embeddings, write_text_embeddings

    cfg = config_from_args(args)
    emb, names = compute_text_embeddings(cfg, device=args.device)
    out = write_text_embeddings(args.out, cfg, emb, names)
    what = f"{cfg.dataset.name}, templates {config_templates(cfg)[0]}"
    print(f"{out}: {len(names)} classes x {emb.shape[1]} ({what})")
    return 0
