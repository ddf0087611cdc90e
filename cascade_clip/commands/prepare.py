"""`cascade-clip prepare`."""

from __future__ import annotations

import argparse

from cascade_clip.errors import InputError, MissingInputError

HELP = "Convert a downloaded dataset to the common format (images, train-id PNG labels, splits)."

REAL_DATASETS = ("coco_stuff_164k", "voc12", "pascal_context_59")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=REAL_DATASETS,
                        help="dataset to convert (default: the config's dataset.name)")
    parser.add_argument("--downloads", default=None,
                        help="download root as given to `cascade-clip download --root` (reads "
                             "DOWNLOADS/DATASET/); default resources/downloads")
    parser.add_argument("--out", default=None,
                        help="output dataset folder (default: the config's dataset.root, else "
                             "resources/data/DATASET)")
    parser.add_argument("--workers", type=int, default=1, help="conversion processes")
    parser.add_argument("--copy", action="store_true",
                        help="copy images instead of hard-linking them to the downloads")
    parser.add_argument("--force", action="store_true",
                        help="convert again even if OUT/dataset.json exists")
    parser.add_argument("--config", default=None, help="experiment YAML (optional)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (with --config)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cascade_clip.data.convert import CONVERTERS

    dataset, out = args.dataset, args.out
    if args.config:
        from cascade_clip.config import load_config, parse_overrides

        cfg = load_config(args.config, parse_overrides(args.overrides))
        dataset = dataset or cfg.dataset.name
        out = out or cfg.dataset.root
    if not dataset:
        raise InputError("no dataset given: pass --dataset NAME or --config FILE")
    if dataset not in CONVERTERS:
        raise InputError(f"dataset {dataset!r} is not converted; the shapes world is made by "
                         "`cascade-clip make-shapes`")
    downloads = Path(args.downloads or "resources/downloads")
    src = downloads / dataset
    if not src.is_dir():
        if downloads.name == dataset and downloads.is_dir():
            raise MissingInputError(f"{src}: download folder not found; --downloads takes the "
                                    f"download root that holds {dataset}/ (here {downloads.parent})")
        raise MissingInputError(f"{src}: download folder not found (run `cascade-clip download "
                                f"--dataset {dataset} --root {downloads}` first)")
    out = Path(out or f"resources/data/{dataset}")
    counts = CONVERTERS[dataset](src, out, workers=args.workers, link=not args.copy,
                                 force=args.force)
    summary = ", ".join(f"{split} {n}" for split, n in counts.items())
    print(f"{dataset}: {summary} images in {out}")
    return 0
