"""Zero-shot transfer in the embedded shapes world, end to end (issue 6/7).

Runs the whole demo workflow (`snakemake --cores N` on config/config.yaml, or another
config) in a scratch folder: generate the world, pre-train the small CLIP, cache frozen
features, train the cascade and the single-decoder baseline inductively on seen classes,
self-train, evaluate. Then prints, for the frozen dense-similarity baseline, the single
decoder on the last block, the cascade with NGA and the cascade + self-training:
mIoU seen / unseen / hIoU on the world's held-out test split (`evaluate.split`), mean +- std
over the training seeds, and each stage's wall time, plus the
issue's targets (unseen >= 30 and >= 1.5x frozen, seen >= 60) and the total wall time.
Recipe choices are made on `val` with benchmarks/shapes_search.py, never here.

A benchmark-style script, not a timed test:

    python benchmarks/shapes_transfer.py                  # default config, 2 cores
    python benchmarks/shapes_transfer.py --cores 2 --work /tmp/shapes_bench --keep
    python benchmarks/shapes_transfer.py --set train.iters=300   # override config keys

Wall times come from Snakemake's per-rule benchmark files (`results/<exp>/benchmarks`).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from cascade_clip.config import set_dotted

ROOT = Path(__file__).resolve().parents[1]
ROWS = (
    ("frozen CLIP dense similarity", "frozen_clip", None),
    ("single decoder, last block", "single_decoder", "single_decoder"),
    ("cascade + NGA", "cascade", "cascade"),
    ("cascade + self-training", "cascade_st", "cascade_st"),
)


def _bench_seconds(path: Path) -> float | None:
    if not path.is_file():
        return None
    with path.open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return float(rows[-1]["s"]) if rows else None


def _fmt(x: float | None, spec: str = ".1f") -> str:
    """`x` formatted, or "-" for a missing value (no benchmark file, or a null score)."""
    if x is None or x != x:
        return "-".rjust(len(format(0.0, spec)))
    return format(x, spec)


def _at_most(x: float | None, limit: float) -> bool:
    """A measured time within `limit`; a missing time is not within any budget."""
    return x is not None and x <= limit


def _at_least(x: float | None, limit: float) -> bool:
    """A score of at least `limit`; a missing (null) score does not meet it."""
    return x is not None and x >= limit


def target_checks(
    metrics: dict[str, dict], stages: dict[str, float | None], total: float
) -> tuple[dict[str, bool], float | None]:
    """The issue's targets, each met or not, and the cascade/frozen unseen ratio (None when
    either unseen mIoU is missing). Anything not measured counts as not met."""
    c, f = metrics["cascade"], metrics["frozen_clip"]
    cu, fu = c.get("miou_unseen"), f.get("miou_unseen")
    if cu is None or fu is None:
        ratio = None
    else:
        ratio = cu / fu if fu > 0 else float("inf")
    checks = {
        "unseen mIoU >= 30": _at_least(cu, 30),
        "unseen >= 1.5x frozen": _at_least(ratio, 1.5),
        "seen mIoU >= 60": _at_least(c.get("miou_seen"), 60),
        "pre-training <= 240 s": _at_most(stages.get("pretrain-clip"), 240),
        "whole workflow <= 600 s": _at_most(total, 600),
    }
    if "cascade_st" in metrics:
        st = metrics["cascade_st"].get("miou_unseen")
        checks["self-training raises unseen"] = st is not None and cu is not None and st > cu
    return checks, ratio


def seed_table(results: Path, seeds: list[int]) -> dict[str, dict]:
    """Print mean +- sample std over the training seeds per row, then every seed's values;
    return the rows' mean metrics (what the targets are checked on)."""
    from cascade_clip.report import _mean_std

    means: dict[str, dict] = {}
    per_seed = []
    print(f"\nover {len(seeds)} training seeds {seeds} (mean +- std):")
    for label, run, train_run in ROWS:
        runs = [run] if train_run is None else [run] + [f"{run}_seed{s}" for s in seeds[1:]]
        found = [json.loads(p.read_text()) for p in (results / "eval" / r / "metrics.json" for r in runs)
                 if p.is_file()]
        if len(found) != len(runs):
            print(f"{label:32s} (missing metrics for some seeds)")
            continue
        row = {}
        cells = []
        for key in ("miou_seen", "miou_unseen", "hiou"):
            values = [float("nan") if m[key] is None else m[key] for m in found]
            mean, std = _mean_std(values)
            row[key] = mean
            cells.append(f"{mean:5.1f} +- {std:4.1f}" if len(values) > 1 else f"{mean:5.1f}        ")
        means[run] = row
        per_seed.append((label, runs, found))
        print(f"{label:32s} " + "  ".join(cells))
    print("\nper seed (S / U / hIoU):")
    for label, runs, found in per_seed:
        values = "; ".join(f"{r}: {_fmt(m['miou_seen'])} / {_fmt(m['miou_unseen'])} / {_fmt(m['hiou'])}"
                           for r, m in zip(runs, found))
        print(f"  {label}: {values}")
    return means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--work", help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", default="0,1,2",
                        help="training seeds (workflow.seeds): each row runs once per seed; "
                        "the table shows mean +- std (default 0,1,2; one seed: the single-run table)")
    args = parser.parse_args(argv)

    cfg = yaml.safe_load(Path(args.config).read_text())
    for item in args.overrides:
        key, _, value = item.partition("=")
        set_dotted(cfg, key, yaml.safe_load(value))
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if len(seeds) > 1:
        set_dotted(cfg, "workflow.seeds", seeds)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="shapes_bench_"))
    (work / "config").mkdir(parents=True, exist_ok=True)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(work),
        "--cores",
        str(args.cores),
    ]
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    total = time.perf_counter() - start
    if res.returncode != 0:
        print(res.stderr[-5000:], file=sys.stderr)
        print(f"workflow failed after {total:.0f}s; logs under {work}/results", file=sys.stderr)
        return 1

    results = work / cfg.get("results_dir", "results") / cfg.get("experiment", "shapes")
    bench = results / "benchmarks"
    stages = {
        "make-shapes": _bench_seconds(bench / "make_shapes.tsv"),
        "pretrain-clip": _bench_seconds(bench / "pretrain_clip.tsv"),
    }
    for tsv in sorted(bench.rglob("*.tsv")):
        name = str(tsv.relative_to(bench).with_suffix(""))
        stages.setdefault(name, _bench_seconds(tsv))

    print(f"\nshapes world: {cfg.get('shapes')}\nsmall CLIP: {cfg.get('pretrain')}")
    print(f"\n{'run':32s} {'seen':>6s} {'unseen':>7s} {'hIoU':>6s} {'train s':>8s} {'eval s':>7s}")
    metrics = {}
    for label, run, train_run in ROWS:
        path = results / "eval" / run / "metrics.json"
        if not path.is_file():
            print(f"{label:32s} (no metrics: {path})")
            continue
        m = json.loads(path.read_text())
        metrics[run] = m
        if train_run is None:
            train_s = None
        elif train_run == "cascade_st":
            train_s = _bench_seconds(bench / "self_train" / f"{train_run}.tsv") or _bench_seconds(
                bench / "train" / f"{train_run}.tsv"
            )
        else:
            train_s = _bench_seconds(bench / "train" / f"{train_run}.tsv")
        eval_s = _bench_seconds(bench / "evaluate" / f"{run}.tsv")
        print(
            f"{label:32s} {_fmt(m['miou_seen'], '6.1f')} {_fmt(m['miou_unseen'], '7.1f')} "
            f"{_fmt(m['hiou'], '6.1f')} "
            f"{_fmt(train_s, '8.0f')} {_fmt(eval_s, '7.0f')}"
        )
    if len(seeds) > 1:
        metrics = seed_table(results, seeds)
    print("\nstage wall times (s): " + ", ".join(f"{k} {_fmt(v, '.0f')}" for k, v in stages.items()))
    print(f"whole workflow: {total:.0f}s on {args.cores} cores (target: <= 600 s)")

    if "cascade" in metrics and "frozen_clip" in metrics:
        checks, ratio = target_checks(metrics, stages, total)
        print(f"cascade unseen / frozen unseen = {_fmt(ratio, '.2f')}")
        for name, ok in checks.items():
            missing = name.startswith("pre-training") and stages.get("pretrain-clip") is None
            print(f"  [{'x' if ok else ' '}] {name}" + (" (no time recorded: not met)" if missing else ""))
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"outputs kept in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
