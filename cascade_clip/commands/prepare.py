"""`cascade-clip prepare`."""

from __future__ import annotations

import argparse

from cascade_clip.errors import InputError, MissingInputError

HELP = ("Convert a downloaded dataset, or your own (--dataset folder | coco), to the common format "
        "(images, train-id PNG labels, splits).")

REAL_DATASETS = ("coco_stuff_164k", "voc12", "pascal_context_59", "voc21", "ade20k_150",
                 "pascal_context_459", "ade20k_847")
OWN_FORMATS = ("folder", "coco")


def _mapping(items: list[str], option: str) -> dict[str, str]:
    """["train=a.txt", "val=b.txt"] -> {"train": "a.txt", "val": "b.txt"}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise InputError(f"{option} {item!r}: expected SPLIT=FILE")
        out[key] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=REAL_DATASETS + OWN_FORMATS,
                        help="dataset to convert, or `folder` / `coco` for your own data (default: the "
                             "config's dataset.name, and its dataset.source for your own)")
    parser.add_argument("--downloads", default=None,
                        help="download root as given to `cascade-clip download --root` (reads "
                             "DOWNLOADS/DATASET/); default resources/downloads")
    parser.add_argument("--out", default=None,
                        help="output dataset folder (default: the config's dataset.root, else "
                             "resources/data/DATASET)")
    own = parser.add_argument_group("your own data (--dataset folder | coco)")
    own.add_argument("--name", help="the dataset's name in dataset.json (default: the config's "
                                    "dataset.name, else the name of OUT)")
    own.add_argument("--images", help="folder of images (flat, or one subfolder per split)")
    own.add_argument("--masks", help="folder: single-channel PNG masks with the images' stems "
                                     "(value i = class i, 255 = ignore); coco: the panoptic PNGs")
    own.add_argument("--classes", help="folder: class-name file, line i names class i")
    own.add_argument("--split", action="append", default=[], metavar="SPLIT=LIST",
                     help="folder: a split list (image stems, one per line); repeatable")
    own.add_argument("--val-fraction", type=float, default=0.1,
                     help="folder without split lists: every n-th image (n = 1/F) is val (default 0.1)")
    own.add_argument("--annotations", action="append", default=[], metavar="SPLIT=JSON",
                     help="coco: a split's instances or panoptic JSON; repeatable")
    parser.add_argument("--workers", type=int, default=1, help="conversion processes")
    parser.add_argument("--copy", action="store_true",
                        help="copy images instead of hard-linking them to the downloads")
    parser.add_argument("--force", action="store_true",
                        help="convert again even if OUT/dataset.json exists")
    parser.add_argument("--config", default=None, help="experiment YAML (optional)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (with --config)")


def _own_source(args: argparse.Namespace, config_source: dict | None) -> dict:
    """dataset.source from the command line, over the config's."""
    source = dict(config_source or {})
    if args.dataset in OWN_FORMATS:
        source["format"] = args.dataset
    given = {"images": args.images, "masks": args.masks, "classes": args.classes,
             "splits": _mapping(args.split, "--split") or None,
             "annotations": _mapping(args.annotations, "--annotations") or None}
    source.update({k: v for k, v in given.items() if v})
    source.setdefault("val_fraction", args.val_fraction)
    if not source.get("images"):
        raise InputError(f"--dataset {source.get('format')}: give --images (or dataset.source.images)")
    return source


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cascade_clip.data.convert import CONVERTERS
    from cascade_clip.data.registry import download_folders

    dataset, out, name, source = args.dataset, args.out, args.name, None
    if args.config:
        from cascade_clip.config import load_config, parse_overrides

        cfg = load_config(args.config, parse_overrides(args.overrides))
        source = cfg.dataset.source
        if dataset is None:
            dataset = source["format"] if source else cfg.dataset.name
        out = out or cfg.dataset.root
        name = name or cfg.dataset.name
    if not dataset:
        raise InputError("no dataset given: pass --dataset NAME or --config FILE")
    kwargs = {"workers": args.workers, "link": not args.copy, "force": args.force}
    if dataset in OWN_FORMATS:
        from cascade_clip.data.own import convert_own

        if not out:
            raise InputError(f"--dataset {dataset}: give --out (or --config with dataset.root)")
        out = Path(out)
        name = name or out.name
        counts = convert_own(_own_source(args, source), out, name, **kwargs)
        dataset = name
    elif dataset not in CONVERTERS:
        raise InputError(f"dataset {dataset!r} is not converted; the shapes world is made by "
                         "`cascade-clip make-shapes`, your own data needs dataset.source "
                         "(or --dataset folder | coco)")
    else:
        folder, *also = download_folders(dataset)  # pascal_context_459 reads pascal_context_59's too
        downloads = Path(args.downloads or "resources/downloads")
        src = downloads / folder
        for name in (folder, *also):
            if (downloads / name).is_dir():
                continue
            if downloads.name == name and downloads.is_dir():
                raise MissingInputError(f"{downloads / name}: download folder not found; --downloads takes "
                                        f"the download root that holds {name}/ (here {downloads.parent})")
            raise MissingInputError(f"{downloads / name}: download folder not found (run `cascade-clip "
                                    f"download --dataset {name} --root {downloads}` first)")
        out = Path(out or f"resources/data/{dataset}")
        counts = CONVERTERS[dataset](src, out, **kwargs)
    summary = ", ".join(f"{split} {n}" for split, n in counts.items())
    print(f"{dataset}: {summary} images in {out}")
    return 0
