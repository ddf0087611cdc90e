"""Recipe search on the shapes world's `val` split: variants x training seeds, mean +- std.

Every recipe choice of the demo is made here, on `val`, never on `test` (the reported
split). It reuses what a finished demo workflow left in WORK (the world, the pre-trained
small CLIP, the text embeddings and the feature cache), trains each variant once per
training seed through the `cascade-clip` CLI (`train.seed`: the world, CLIP and cache stay
fixed) and evaluates it on `val`:

    python benchmarks/shapes_search.py --work /tmp/clone --seeds 0,1,2 --jobs 2 \\
        --variant "cascade" \\
        --variant "single model.stages=[[6]]" \\
        --variant "cascade-no-adapter model.decoder.input_adapter=false"

A variant is a name, then `KEY=VALUE` config overrides (as `--set` takes them). A variant
that changes what the cache holds (`model.tap_projection`, `model.tap_seed`,
`model.cls_token`, `cache.encoding`, `model.stages` beyond the cached blocks) gets its own
cache, written once under WORK/search/cache/. Runs whose metrics exist are not run again. Prints (and
writes WORK/search/summary.csv) mean +- sample std over the seeds of mIoU seen / unseen /
hIoU per variant, and each run's wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from cascade_clip.config import load_config

CACHE_KEYS = ("model.tap_projection", "model.tap_seed", "model.cls_token", "clip.", "cache.encoding")


def parse_variant(spec: str) -> tuple[str, list[str]]:
    name, *sets = spec.split()
    bad = [s for s in sets if "=" not in s]
    if bad:
        raise SystemExit(f"--variant {spec!r}: {bad} is not KEY=VALUE")
    return name, sets


def run(cmd: list[str], log: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    return time.time() - t0


def cache_for(work: Path, name: str, sets: list[str], config: Path) -> Path:
    """The demo's cache, or one written for a variant that changes the cached features."""
    cached_blocks = {b for stage in load_config(config).model.stages for b in stage}
    stages = [s for s in sets if s.startswith("model.stages=")]
    wanted = {b for stage in yaml.safe_load(stages[0].split("=", 1)[1]) for b in stage} if stages else set()
    if not any(s.startswith(CACHE_KEYS) for s in sets) and wanted <= cached_blocks:
        return work / "results" / "shapes" / "cache" / "train.h5"
    out = work / "search" / "cache" / f"{name}.h5"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        overrides = [a for s in sets for a in ("--set", s)]
        cmd = [sys.executable, "-m", "cascade_clip.cli", "cache-features", "--config", str(config),
               *overrides, "--shard", "0/1", "--out", str(out), "--workers", "0"]
        run(cmd, out.with_suffix(".log"), 2)
    return out


def train_and_evaluate(work: Path, config: Path, name: str, sets: list[str], seed: int, cache: Path,
                       split: str) -> dict:
    out = work / "search" / name / f"seed{seed}"
    metrics_path = out / f"eval_{split}" / "metrics.json"
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    text = work / "results" / "shapes" / "text" / "shapes.h5"
    overrides = [a for s in [*sets, f"train.seed={seed}"] for a in ("--set", s)]
    cli = [sys.executable, "-m", "cascade_clip.cli"]
    t_train = run([*cli, "train", "--config", str(config), *overrides, "--cache", str(cache),
                   "--text", str(text), "--out", str(out), "--device", "cpu"], out / "train.log", 1)
    run([*cli, "evaluate", "--config", str(config), *overrides, "--checkpoint", str(out / "model_final.pt"),
         "--text", str(text), "--split", split, "--out", str(metrics_path.parent), "--device", "cpu"],
        out / f"eval_{split}.log", 1)
    metrics = json.loads(metrics_path.read_text())
    metrics["train_seconds"] = t_train
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return metrics


def mean_std(values: list[float]) -> str:
    """"mean +- sample std" (the report's statistic), or the value alone for one seed."""
    from cascade_clip.report import _mean_std

    mean, std = _mean_std(values)
    return f"{mean:.1f}" if len(values) < 2 else f"{mean:.1f} +- {std:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="folder a demo workflow finished in")
    parser.add_argument("--variant", action="append", required=True, help='"NAME KEY=VALUE ..."')
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--split", default="val", help="val (tuning); test holds the reported numbers")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    os.chdir(work)  # the config's resource paths are relative to the workflow folder
    config = work / "results" / "shapes" / "config.yaml"  # the workflow's effective config
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [parse_variant(v) for v in args.variant]
    caches = {name: cache_for(work, name, sets, config) for name, sets in variants}
    jobs = [(name, sets, seed) for name, sets in variants for seed in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(
            lambda j: train_and_evaluate(work, config, j[0], j[1], j[2], caches[j[0]], args.split), jobs))
    rows = []
    print(f"{args.split} split, seeds {seeds} (mean +- sample std)")
    print(f"{'variant':28s} {'seen':>12s} {'unseen':>12s} {'hIoU':>12s}  train s")
    for name, sets in variants:
        got = [m for (n, _, _), m in zip(jobs, results) if n == name]
        cols = {k: [m[k] for m in got] for k in ("miou_seen", "miou_unseen", "hiou")}
        secs = [m.get("train_seconds") for m in got if m.get("train_seconds")]
        print(f"{name:28s} {mean_std(cols['miou_seen']):>12s} {mean_std(cols['miou_unseen']):>12s} "
              f"{mean_std(cols['hiou']):>12s}  {statistics.mean(secs) if secs else float('nan'):.0f}")
        for seed, m in zip(seeds, got):
            rows.append({"variant": name, "overrides": " ".join(sets), "seed": seed,
                         **{k: m[k] for k in ("miou_seen", "miou_unseen", "hiou")}})
    with (work / "search" / "summary.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
