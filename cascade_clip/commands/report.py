"""`cascade-clip report`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cascade_clip.config import add_config_arguments, config_from_args

HELP = "Collect metrics, curves, examples and run times into the report's tables and figures."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--results", required=True, help="results/<experiment>")
    parser.add_argument("--runs", nargs="+", required=True, help="run names (eval/<run>/metrics.json)")
    parser.add_argument("--cross", nargs="*", default=[], help="cross-evaluation datasets")
    parser.add_argument("--examples", required=True, help="folder of example prediction PNGs")
    parser.add_argument("--out", required=True, help="report folder")


def run(args: argparse.Namespace) -> int:
    from cascade_clip.plan.sizes import workflow_settings
    from cascade_clip.report import build_report, fmt_score

    cfg = config_from_args(args)  # refuse a bad config here too
    results = Path(args.results)
    split = json.loads((results / "split.json").read_text())
    rows = build_report(results, args.runs, split["unseen"], Path(args.examples), Path(args.out), args.cross,
                        ablations=cfg.extra.get("ablations"), dataset=cfg.dataset.name,
                        main_run=workflow_settings(cfg)["main_run"])
    for r in rows:
        seen, unseen, hiou = (fmt_score(r[k], "5.1f") for k in ("miou_seen", "miou_unseen", "hiou"))
        print(f"{r['model']:<50} S {seen}  U {unseen}  hIoU {hiou}")
    return 0
