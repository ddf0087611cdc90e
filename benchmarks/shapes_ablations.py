"""The paper's ablation tables (4-10) in miniature on the shapes world: run them, then say per
table whether the paper's direction holds in ours within the training seeds' spread.

Runs config/shapes_ablations.yaml (every table row as an ablation row, x `workflow.seeds`,
all of them from one feature cache) through Snakemake in WORK, for the rows of the tables
asked (`--tables t4,t5`: a chunk; finished runs are kept, so chunks add up and a killed run
resumes), then prints per paper table: the paper's rows (COCO-Stuff 164K, ViT-B/16) beside
ours (mean +- sample std over the seeds, on the world's held-out `test` split), and each row
against the row the paper compares it with (the table's reference: the full model; in
Table 10 each baseline), for S, U and hIoU: the paper's difference, ours +- the larger of the
two rows' spreads, and a verdict (cascade_clip.paper.compare): "holds" (ours beyond the
spread, the paper's sign), "reversed" (beyond the spread, the other sign), "within spread"
(no result). The recipe is the demo's, chosen on `val`; nothing is tuned here.

    python benchmarks/shapes_ablations.py --work /tmp/grid --cores 2            # every table
    python benchmarks/shapes_ablations.py --work /tmp/grid --tables t4,t5       # one chunk
    python benchmarks/shapes_ablations.py --work /tmp/grid --print-only         # the tables

Wall and CPU seconds per stage come from Snakemake's benchmark files.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cascade_clip.config import load_config, set_dotted
from cascade_clip.paper import compare, paper_row, paper_rows, paper_tables, row_paper_ids
from cascade_clip.report import ours, paper_matches, row_means, run_row, seed_groups

ROOT = Path(__file__).resolve().parents[1]


def rows_for(ablations: dict, tables: list[str] | None) -> list[str]:
    """The ablation rows of the given paper tables, and the rows their rows are compared with."""
    rows = paper_rows()
    wanted = set()
    for row in ablations.values():
        for row_id in row_paper_ids(row):
            if tables is None or rows[row_id].table in tables:
                wanted.add(row_id)
                if rows[row_id].vs:
                    wanted.add(rows[row_id].vs)
    return [name for name, row in ablations.items() if wanted & set(row_paper_ids(row))]


def run_names(row: str, seeds: list[int | None]) -> list[str]:
    """As workflow/rules/common.smk names them: the first seed's run keeps the row's name."""
    return [row] + [f"{row}_seed{s}" for s in seeds[1:]]


def _bench(path: Path) -> tuple[float, float] | None:
    """(wall s, CPU s) of a job's last record in its Snakemake benchmark file."""
    if not path.is_file():
        return None
    with path.open() as fh:
        records = list(csv.DictReader(fh, delimiter="\t"))
    return (float(records[-1]["s"]), float(records[-1]["cpu_time"])) if records else None


def print_tables(results: Path, ablations: dict, seeds: list, dataset: str, main_run: str,
                 markdown: bool = False) -> dict:
    """The paper beside ours, per table, each row with its direction verdicts against the row
    the paper compares it with; `markdown`: also one table of every row. Returns the counts."""
    runs = [r for row in ablations for r in run_names(row, seeds)
            if (results / "eval" / r / "metrics.json").is_file()]
    complete = {row for row in ablations if all(r in runs for r in run_names(row, seeds))}
    means = row_means([run_row(results, r) for r in runs], seed_groups(runs))
    recs = [r for r in means if r["run"] in complete]
    by_id: dict[str, dict] = {}
    for p, rec in paper_matches(recs, ablations, dataset, main_run):
        by_id.setdefault(p.id, rec)
    totals = {"holds": 0, "reversed": 0, "within spread": 0}
    md = ["| table | paper row | run | paper S / U / h | ours S / U / h | against | "
          "paper's direction S / U / h |", "|---|---|---|---|---|---|---|"]
    for table in paper_tables().values():
        here = [i for i in table.rows if i in by_id]
        if not here or table.show_all or table.name == "release":  # main results: not a miniature row
            continue
        print(f"\n{table.title}  (paper: {paper_row(here[0]).dataset}; ours: {dataset}, `test`, "
              f"mean +- std over {len(seeds)} seed(s))")
        print(f"  {'paper row':<44} {'run':<22} {'paper S / U / h':<18} ours S / U / h")
        counts = {"holds": 0, "reversed": 0, "within spread": 0}
        for row_id in here:
            p, rec = paper_row(row_id), by_id[row_id]
            o = ours(rec)
            cells = " / ".join(f"{o[m]:.1f} +- {o[m + '_std']:.1f}" for m in ("S", "U", "h"))
            paper = f"{p.S:4.1f} / {p.U:4.1f} / {p.h:4.1f}"
            print(f"  {p.label[:44]:<44} {rec['run']:<22} {paper}   {cells}")
            verdicts, against = [], ""
            if p.vs and p.vs in by_id and by_id[p.vs]["run"] != rec["run"]:
                against = paper_row(p.vs).label
                verdicts = compare(o, ours(by_id[p.vs]), p, paper_row(p.vs))
                text = "; ".join(f"{d.metric} paper {d.paper:+.1f}, ours {d.ours:+.1f} +- {d.spread:.1f} "
                                 f"{d.verdict}" for d in verdicts)
                print(f"      against {against}: {text}")
                for d in verdicts:
                    if d.verdict in counts:
                        counts[d.verdict] += 1
            ours_md = " / ".join(f"{o[m]:.1f} ± {o[m + '_std']:.1f}" for m in ("S", "U", "h"))
            paper_md = f"{p.S:.1f} / {p.U:.1f} / {p.h:.1f}"
            verdict_md = " / ".join(d.verdict for d in verdicts)
            md.append(f"| {table.name[1:]} | {p.label} | `{rec['run']}` | {paper_md} | {ours_md} | "
                      f"{against} | {verdict_md} |")
        for k, v in counts.items():
            totals[k] += v
        print(f"  the paper's direction: holds {counts['holds']}, reversed {counts['reversed']}, "
              f"within the spread {counts['within spread']} (of S, U, hIoU per compared row)")
    if markdown:
        print("\n" + "\n".join(md))
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "config" / "shapes_ablations.yaml"))
    parser.add_argument("--work", required=True, help="working folder (kept: chunks and reruns add up)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--tables", help="comma-separated paper tables to run (t4,...,t10); default: all")
    parser.add_argument("--print-only", action="store_true", help="run nothing; print what has finished")
    parser.add_argument("--markdown", action="store_true", help="also print every row as one markdown table")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    work = Path(args.work)
    data = yaml.safe_load(Path(args.config).read_text())
    for item in args.overrides:
        key, _, value = item.partition("=")
        set_dotted(data, key, yaml.safe_load(value))
    config = work / "config" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(data, sort_keys=False)
    if not config.is_file() or config.read_text() != text:
        config.write_text(text)
    cfg = load_config(config)
    ablations = cfg.extra["ablations"]
    wf = cfg.extra.get("workflow") or {}
    seeds = wf.get("seeds") or [None]
    main_run = wf.get("main_run", "cascade")
    results = work / cfg.results_dir / cfg.experiment
    tables = args.tables.split(",") if args.tables else None
    rows = rows_for(ablations, tables)

    if not args.print_only:
        # as the rules name them: relative to the working folder
        relative = Path(cfg.results_dir) / cfg.experiment
        targets = [str(relative / "eval" / r / "metrics.json") for row in rows for r in run_names(row, seeds)]
        cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work),
               "--cores", str(args.cores), "--rerun-incomplete", *targets]  # a killed chunk resumes
        print(f"running {len(targets)} evaluations (rows {', '.join(rows)}) x seeds {seeds}", flush=True)
        start = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if res.returncode != 0:
            print(res.stderr[-5000:], file=sys.stderr)
            print(f"workflow failed after {wall:.0f} s; logs under {results / 'logs'}", file=sys.stderr)
            return 1
        print(f"this invocation: {wall:.0f} s on {args.cores} cores")

    bench = results / "benchmarks"
    stages = {str(p.relative_to(bench).with_suffix("")): _bench(p) for p in sorted(bench.rglob("*.tsv"))}
    done = {k: v for k, v in stages.items() if v is not None}
    for group in ("train", "evaluate"):
        jobs = [v for k, v in done.items() if k.startswith(group + "/")]
        if jobs:
            wall, cpu = sum(w for w, _ in jobs), sum(c for _, c in jobs)
            print(f"{group}: {len(jobs)} jobs, {wall:.0f} s of job wall time, {cpu:.0f} CPU s "
                  f"(mean {wall / len(jobs):.0f} s a job)")
    other = {k: v for k, v in done.items() if not k.startswith(("train/", "evaluate/"))}
    print("other stages (wall s): " + ", ".join(f"{k} {w:.0f}" for k, (w, _) in other.items()))
    totals = print_tables(results, ablations, seeds, cfg.dataset.name, main_run, args.markdown)
    print(f"\nall tables: the paper's direction holds {totals['holds']}, reversed {totals['reversed']}, "
          f"within the spread {totals['within spread']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
