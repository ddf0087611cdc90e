"""`cascade-clip evaluate`."""

from __future__ import annotations

import argparse

from cascade_clip.config import add_config_arguments
from cascade_clip.errors import InputError

HELP = "Evaluate a checkpoint: sliding-window inference, mIoU seen/unseen, hIoU."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", metavar="CKPT", help="model_final.pt of a training run")
    parser.add_argument(
        "--out", required=True, help="output directory (metrics.json, per_class.csv, examples/)"
    )
    parser.add_argument("--split", help="split to evaluate (default: dataset.val_split)")
    parser.add_argument("--text", metavar="H5", help="cached class text embeddings (else computed now)")
    parser.add_argument(
        "--baseline",
        choices=("dense",),
        help="dense: frozen CLIP's own dense similarity, no decoder and no checkpoint",
    )
    parser.add_argument(
        "--dataset-root",
        metavar="DIR",
        help="cross-dataset: evaluate on this prepared dataset instead, every class treated as seen",
    )
    parser.add_argument("--dataset", metavar="NAME", help="registry name of --dataset-root's dataset")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")


def run(args: argparse.Namespace) -> int:
    from cascade_clip.config import config_from_args
    from cascade_clip.distributed import cleanup, is_main
    from cascade_clip.evaluate import evaluate

    cfg = config_from_args(args)
    cross = args.dataset_root is not None
    if cross:
        from cascade_clip.data import read_dataset_json

        cfg.dataset.root = args.dataset_root
        cfg.dataset.name = args.dataset or read_dataset_json(args.dataset_root)["name"]
        cfg.dataset.unseen = []
    elif args.dataset is not None:
        raise InputError("--dataset names the dataset of --dataset-root; give both")
    try:
        metrics = evaluate(
            cfg,
            args.out,
            checkpoint=args.checkpoint,
            split=args.split,
            text=args.text,
            baseline=args.baseline,
            cross_dataset=cross,
            device=args.device,
        )
        main = is_main()
    finally:
        cleanup()
    if main:
        print(
            f"cascade-clip evaluate: {metrics['num_images']} images, mIoU(S) {metrics['miou_seen']:.2f} "
            f"mIoU(U) {metrics['miou_unseen']:.2f} hIoU {metrics['hiou']:.2f} -> {args.out}/metrics.json"
        )
    return 0
