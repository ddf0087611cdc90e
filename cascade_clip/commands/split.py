"""`cascade-clip split`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cascade_clip.config import add_config_arguments, config_from_args
from cascade_clip.errors import InputError

HELP = "Resolve the config's seen/unseen class names against the dataset and write split.json."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="split.json to write")


def run(args: argparse.Namespace) -> int:
    from cascade_clip.data import get_spec, resolve_split
    from cascade_clip.data.registry import DATASETS, check_unseen_names

    cfg = config_from_args(args)
    spec = get_spec(cfg.dataset.name, cfg.dataset.root)
    names = check_unseen_names(spec.name, cfg.dataset.unseen, spec.classes, args.config, cfg.dataset.root)
    seen, unseen = resolve_split(spec, names)
    if not seen:
        raise InputError(f"{args.config}: every class of {spec.name} is unseen; nothing to train on")
    if spec.name not in DATASETS:
        _check_unseen_are_evaluated(cfg, names, args.config)
    split = {
        "dataset": spec.name,
        "classes": list(spec.classes),
        "seen": [spec.classes[i] for i in seen],
        "unseen": [spec.classes[i] for i in unseen],
        "seen_ids": seen,
        "unseen_ids": unseen,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(split, indent=2) + "\n")
    tmp.replace(out)
    print(f"{spec.name}: {len(seen)} seen, {len(unseen)} unseen classes: {', '.join(split['unseen'])}")
    return 0


def _check_unseen_are_evaluated(cfg, unseen: list[str], where: str) -> None:
    """Your own data: every unseen class must occur in the evaluation split, else its IoU is
    undefined and mIoU(U) comes out n/a (NaN) at the end of a whole run. Reads the split's
    class index (splits/<split>.classes.json, which prepare writes); without one, no check."""
    from cascade_clip.data import load_classes

    split = cfg.evaluate.split or cfg.dataset.val_split
    index = Path(cfg.dataset.root) / "splits" / f"{split}.classes.json"
    if not index.is_file():
        return
    try:
        presence = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{index}: not valid JSON ({err})") from None
    present = {int(c) for ids in presence.values() for c in ids}
    classes = load_classes(cfg.dataset.root)
    missing = [n for n in unseen if classes.index(n) not in present]
    if missing:
        raise InputError(
            f"{where}: dataset.unseen: {missing} never occur in split {split!r} of {cfg.dataset.root}: "
            "their IoU would be undefined and mIoU(U) n/a; hold out classes the evaluation split holds"
        )
