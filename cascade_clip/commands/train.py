"""`cascade-clip train`."""

from __future__ import annotations

import argparse

from cascade_clip.config import add_config_arguments

HELP = "Train the cascaded decoders (inductive, transductive self-training or fully supervised)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/ckpt_last.pt if it exists (else start)"
    )
    parser.add_argument(
        "--init", metavar="CKPT", help="start from these weights (self-training: the inductive ckpt_half.pt)"
    )
    parser.add_argument(
        "--cache", metavar="H5", help="train from this frozen-feature cache (encoder_mode frozen)"
    )
    parser.add_argument("--text", metavar="H5", help="cached class text embeddings (else computed now)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")


def run(args: argparse.Namespace) -> int:
    from cascade_clip.config import config_from_args
    from cascade_clip.distributed import cleanup, is_main
    from cascade_clip.train import train

    cfg = config_from_args(args)
    try:
        final = train(
            cfg,
            args.out,
            cache=args.cache,
            text=args.text,
            init=args.init,
            resume=args.resume,
            device=args.device,
        )
        main = is_main()
    finally:
        cleanup()
    if main:
        print(f"cascade-clip train: wrote {final}")
    return 0
