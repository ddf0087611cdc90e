"""Tables and figures for the Snakemake report, from the files the stages wrote.

Reads `<results>/eval/<run>/metrics.json`, `<results>/eval/cross/<dataset>/metrics.json`,
`<results>/runs/<run>/log.jsonl` and Snakemake's `<results>/benchmarks/**/*.tsv`; writes
summary.{html,csv}, paper.{html,csv} (the paper's figures beside ours), per_class.html,
curves.png, runtimes.html and examples/.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade_clip.errors import InputError, MissingInputError

if TYPE_CHECKING:
    from cascade_clip.paper import PaperRow

# What each run name means in the tables (names not listed are shown as they are).
RUN_LABELS = {
    "frozen_clip": "frozen CLIP dense similarity (no decoder)",
    "single_decoder": "one decoder on the last block",
    "cascade": "Cascade-CLIP (NGA, cascaded decoders)",
    "cascade_st": "Cascade-CLIP + self-training (transductive)",
    "frozen": "Frozen CLIP + Cascade-CLIP (no prompts; decoders on cached features)",
}

_STYLE = (
    "<style>table{border-collapse:collapse;font-family:sans-serif;font-size:14px}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#eee}td:first-child,th:first-child{text-align:left}</style>"
)


# How a score that does not exist is shown: an mIoU over no classes (e.g. `dataset.unseen: []`
# has no unseen mIoU and so no hIoU; metrics.json holds null for it), a class in neither the
# ground truth nor the predictions, a class a run did not score.
MISSING = "n/a"


def as_score(value: float | int | None) -> float:
    """A metrics.json score as a float; null (NaN written by evaluation) becomes NaN."""
    return float("nan") if value is None else float(value)


def fmt_score(value: float | None, spec: str = ".1f") -> str:
    """`value` formatted with `spec`, or MISSING (right-aligned to the same width) if null/NaN."""
    if value is None or math.isnan(value):
        width = format(0.0, spec)
        return MISSING.rjust(len(width))
    return format(value, spec)


def _fmt(value: float | None) -> str:
    return fmt_score(value)


def _csv_value(value: object) -> object:
    """NaN/None as an empty CSV field (pandas and csv readers take it as missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> str:
    return (
        f"<html><head><meta charset='utf-8'>{_STYLE}</head><body><h3>{html.escape(title)}</h3>"
        f"{_table(header, rows)}</body></html>\n"
    )


def read_metrics(path: Path) -> dict:
    if not path.is_file():
        raise MissingInputError(f"{path}: metrics.json not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None


# Runs of one ablation row under several training seeds (`workflow.seeds`) are named
# `<row>` (the first seed) and `<row>_seed<n>` (the others).
SEED_SUFFIX = re.compile(r"_seed(\d+)$")
SCORES = ("miou_seen", "miou_unseen", "hiou")


def row_of(run: str) -> str:
    """The ablation row a run belongs to: its name without a `_seed<n>` suffix."""
    return SEED_SUFFIX.sub("", run)


def run_row(results: Path, run: str) -> dict:
    """One run's scores from its metrics.json, labelled."""
    m = read_metrics(results / "eval" / run / "metrics.json")
    return {
        "run": run,
        "model": RUN_LABELS.get(row_of(run), row_of(run)),
        "setting": m.get("setting", ""),
        "miou_seen": as_score(m["miou_seen"]),
        "miou_unseen": as_score(m["miou_unseen"]),
        "hiou": as_score(m["hiou"]),
        "num_images": m.get("num_images", ""),
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); NaN std for one value, NaN if any is."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def _pm(mean: float, std: float) -> str:
    return _fmt(mean) if math.isnan(std) else f"{_fmt(mean)} ± {std:.1f}"


def seed_groups(runs: Sequence[str]) -> dict[str, list[str]]:
    """row -> its runs, rows in first-appearance order."""
    groups: dict[str, list[str]] = {}
    for run in runs:
        groups.setdefault(row_of(run), []).append(run)
    return groups


def row_means(per_run: list[dict], groups: dict[str, list[str]]) -> list[dict]:
    """One record per ablation row: each score's mean and sample std over its seed runs."""
    by_run = {r["run"]: r for r in per_run}
    rows = []
    for row, members in groups.items():
        first = by_run[members[0]]
        rec = {"run": row, "model": first["model"], "setting": first["setting"], "seeds": len(members)}
        for key in SCORES:
            rec[key], rec[f"{key}_std"] = _mean_std([by_run[m][key] for m in members])
        rec["num_images"] = first["num_images"]
        rows.append(rec)
    return rows


def _seed_tables(per_run: list[dict], groups: dict[str, list[str]], out: Path) -> list[dict]:
    """Several seeds: summary = mean ± std per row; per_seed.{html,csv} = every run."""
    rows = row_means(per_run, groups)
    with open(out / "per_seed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(per_run[0]))
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in r.items()} for r in per_run)
    (out / "per_seed.html").write_text(
        _html_table(
            ["run", "setting", "mIoU(S)", "mIoU(U)", "hIoU"],
            [[r["run"], r["setting"], *(_fmt(r[k]) for k in SCORES)] for r in per_run],
            "Every run (one per ablation row and training seed)",
        )
    )
    return rows


def summary_tables(results: Path, runs: Sequence[str], cross: Sequence[str], out: Path) -> list[dict]:
    """summary.{html,csv}: one row per run; with several training seeds per row, one row per
    ablation row with mean ± sample std over its seeds (and per_seed.{html,csv})."""
    per_run = [run_row(results, run) for run in runs]
    groups = seed_groups(runs)
    several = any(len(m) > 1 for m in groups.values())
    rows = _seed_tables(per_run, groups, out) if several else per_run
    for dataset in cross:
        m = read_metrics(results / "eval" / "cross" / dataset / "metrics.json")
        rows.append(
            {
                "run": f"cross:{dataset}",
                "model": f"main run evaluated on {dataset} (all classes seen)",
                "setting": "cross-dataset",
                "miou_seen": as_score(m.get("miou", m["miou_seen"])),
                "miou_unseen": float("nan"),
                "hiou": float("nan"),
                "num_images": m.get("num_images", ""),
                "miou_gt_only": _gt_only_miou(m),
            }
        )
    fields = list(dict.fromkeys(k for r in rows for k in r))  # cross rows have no std/seeds
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: _csv_value(r.get(k)) for k in fields} for r in rows)
    table = [
        [
            r["model"],
            r["setting"],
            *(_pm(r[k], r.get(f"{k}_std", float("nan"))) for k in SCORES),
            str(r["num_images"]),
        ]
        + ([str(r.get("seeds", ""))] if several else [])
        for r in rows
    ]
    header = ["model", "setting", "mIoU(S)", "mIoU(U)", "hIoU", "images"] + (["seeds"] if several else [])
    title = "Zero-shot segmentation" + (" (mean ± std over training seeds)" if several else "")
    (out / "summary.html").write_text(_html_table(header, table, title))
    return rows


def _gt_only_miou(m: dict) -> float:
    """mIoU over the classes the ground truth holds (metrics' gt_only rule); NaN for a
    metrics.json written before both rules were recorded."""
    return as_score(((m.get("by_absent_class_rule") or {}).get("gt_only") or {}).get("miou"))


def open_vocab_table(results: Path, cross: Sequence[str], out: Path) -> None:
    """open_vocab.html (a page beside those the module doc lists): each cross-dataset target's
    mIoU under both rules for classes absent from the ground truth (cascade_clip.metrics), by
    which the peers' 459- and 847-class numbers differ, VOC-21's background protocol, and the
    field's figures for the target beside them (cascade_clip/data/field.yaml), each entry's
    source and protocol listed under the table."""
    from cascade_clip.data.registry import VOC21_BACKGROUND_LABELS
    from cascade_clip.paper import field_entries

    entries = field_entries()
    rows = []
    for dataset in cross:
        m = read_metrics(results / "eval" / "cross" / dataset / "metrics.json")
        target = dataset
        protocol = m.get("voc21_background")
        if protocol:  # the protocol VOC-21 was scored with
            target += f" (background: {VOC21_BACKGROUND_LABELS.get(protocol, protocol)})"
        rows.append([target, str(len(m.get("per_class_iou", {}))), str(m.get("num_images", "")),
                     _fmt(as_score(m.get("miou", m.get("miou_seen")))), _fmt(_gt_only_miou(m)),
                     *(_fmt(e.miou.get(dataset)) for e in entries)])
    header = ["target", "classes", "images", "mIoU: classes in ground truth or prediction",
              "mIoU: classes in ground truth only", *(f"{e.method} {e.backbone}" for e in entries)]
    title = ("Main run on other datasets (every class seen), under both rules for absent classes, "
             "beside the field's")
    notes = "".join(f"<li><b>{html.escape(e.method)} {html.escape(e.backbone)}</b>: {html.escape(e.source)}. "
                    f"Protocol: {html.escape(e.protocol)}.</li>" for e in entries)
    page = _html_table(header, rows, title).replace(
        "</body>", "<p>The field's figures (mIoU %, COCO-Stuff-trained, every class seen; ours is "
                   "gt_or_pred, as theirs):</p><ul>" + notes + "</ul></body>")
    (out / "open_vocab.html").write_text(page)


def per_class_table(results: Path, runs: Sequence[str], unseen: Sequence[str], out: Path) -> None:
    metrics = {run: read_metrics(results / "eval" / run / "metrics.json") for run in runs}
    classes = list(next(iter(metrics.values()))["per_class_iou"])
    rows = []
    for name in classes:
        label = f"{name} *" if name in set(unseen) else name
        rows.append([label] + [_fmt(metrics[r]["per_class_iou"].get(name)) for r in runs])
    (out / "per_class.html").write_text(
        _html_table(["class (* unseen)"] + list(runs), rows, "Per-class IoU (%)")
    )


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves_figure(results: Path, runs: Sequence[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        log = [r for r in read_log(results / "runs" / run / "log.jsonl") if "loss" in r]
        if not log:
            continue
        steps = [r["step"] for r in log]
        ax_loss.plot(steps, [r["loss"] for r in log], label=RUN_LABELS.get(run, run))
        if all("lr" in r for r in log):
            ax_lr.plot(steps, [r["lr"] for r in log], label=run)
    ax_loss.set(xlabel="iteration", ylabel="loss (100 focal + dice)", yscale="log", title="training loss")
    ax_lr.set(xlabel="iteration", ylabel="learning rate", title="schedule")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def runtimes_table(results: Path, out: Path) -> None:
    rows = []
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        with open(tsv) as f:
            records = list(csv.DictReader(f, delimiter="\t"))
        if not records:
            continue
        r = records[-1]
        stage = str(tsv.relative_to(results / "benchmarks").with_suffix(""))
        rows.append([stage, f"{float(r['s']):.1f}", r.get("max_rss", ""), r.get("cpu_time", "")])
    total = sum(float(r[1]) for r in rows)
    rows.append(["total (sum of stages)", f"{total:.1f}", "", ""])
    (out / "runtimes.html").write_text(
        _html_table(["stage", "wall time (s)", "peak RSS (MB)", "CPU time (s)"], rows, "Stage run times")
    )


def copy_examples(examples: Path, out: Path) -> None:
    dest = out / "examples"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for png in sorted(examples.glob("*.png")):
        shutil.copy2(png, dest / png.name)


# --- the paper beside ours (docs/design.md: The paper's experiments) -------------------------

PAPER_SCORES = {"S": "miou_seen", "U": "miou_unseen", "h": "hiou"}


def paper_matches(rows: Sequence[dict], ablations: Mapping[str, Any] | None, dataset: str | None,
                  main_run: str | None) -> list[tuple[PaperRow, dict]]:
    """(paper row, our row record from `row_means`) for every row whose ablation names paper
    rows, and for the main run and its self-training run the main results of the dataset and
    setting (the paper's Table 2 or 3, the release README's average); in the paper's table
    order."""
    from cascade_clip.paper import main_result_rows, paper_row, paper_tables, row_paper_ids

    pairs: dict[str, list[dict]] = {}
    for rec in rows:
        ids = row_paper_ids((ablations or {}).get(rec["run"]))
        if main_run is not None and dataset is not None and rec["run"] in (main_run, f"{main_run}_st"):
            ids = ids + [r.id for r in main_result_rows(dataset, rec["setting"])]
        for row_id in ids:
            pairs.setdefault(row_id, []).append(rec)
    order = [row_id for t in paper_tables().values() for row_id in t.rows]
    return [(paper_row(row_id), rec) for row_id in order for rec in pairs.get(row_id, [])]


def ours(rec: dict) -> dict[str, float]:
    """An our-row record as {"S": mean, "S_std": std, "U": ..., "h": ...}."""
    out = {}
    for short, key in PAPER_SCORES.items():
        out[short] = rec[key]
        out[f"{short}_std"] = rec.get(f"{key}_std", float("nan"))
    return out


def paper_tables_report(rows: Sequence[dict], ablations: Mapping[str, Any] | None, dataset: str | None,
                        main_run: str | None, out: Path) -> list[dict]:
    """paper.{html,csv}: per paper table with a run, laid out as the paper's: its rows, the
    paper's S / U / h, ours (mean ± std over seeds, n) and ours − paper (only when the run's
    dataset is the paper row's: the shapes miniature's rows stand beside COCO-Stuff's). The
    main-results tables (Tables 2, 3: `show_all`) also show their other rows of the dataset
    (ZegCLIP's), which no run here reproduces."""
    from cascade_clip.paper import paper_row, paper_sources, paper_tables

    matches = paper_matches(rows, ablations, dataset, main_run)
    records, sections = [], []
    for table in paper_tables().values():
        here = [(p, rec) for p, rec in matches if p.table == table.name]
        if not here:
            continue
        if table.show_all:  # the table's rows of the matched datasets, in its order
            matched = {p.id for p, _ in here}
            shown = {p.dataset for p, _ in here}
            here = [pair for row_id in table.rows for pair in
                    ([(p, rec) for p, rec in here if p.id == row_id] if row_id in matched
                     else [(paper_row(row_id), None)] if paper_row(row_id).dataset in shown else [])]
        body = []
        for p, rec in here:
            paper_cells = [_pm(p.S, p.S_spread if p.S_spread is not None else float("nan")),
                           _pm(p.U, p.U_spread if p.U_spread is not None else float("nan")),
                           _fmt(p.h) + ("*" if p.h_computed else "")]
            if rec is None:
                body.append([p.label, "not run here", *paper_cells, *[""] * 7])
                continue
            o = ours(rec)
            same = p.dataset == dataset
            rec_out = {"table": table.name, "paper_row": p.id, "run": rec["run"], "seeds": rec["seeds"],
                       "dataset": dataset, "paper_dataset": p.dataset}
            for m in PAPER_SCORES:
                rec_out[f"paper_{m}"] = getattr(p, m)
                rec_out[f"ours_{m}"], rec_out[f"ours_{m}_std"] = o[m], o[f"{m}_std"]
                rec_out[f"diff_{m}"] = o[m] - getattr(p, m) if same else float("nan")
            records.append(rec_out)
            ours_cells = [_pm(o[m], o[f"{m}_std"]) for m in PAPER_SCORES]
            diff = ([f"{rec_out[f'diff_{m}']:+.1f}" for m in PAPER_SCORES] if same
                    else ["other dataset"] * 3)
            body.append([p.label, rec["run"], *paper_cells, *ours_cells, str(rec["seeds"]), *diff])
        cite = paper_sources()[table.source]["cite"]
        sections.append((f"{table.title} (source: {cite})", body))
    fields = ["table", "paper_row", "run", "seeds", "dataset", "paper_dataset"] + [
        f"{w}_{m}{sfx}" for w, sfxs in (("paper", ("",)), ("ours", ("", "_std")), ("diff", ("",)))
        for m in PAPER_SCORES for sfx in sfxs]
    with open(out / "paper.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: _csv_value(r.get(k)) for k in fields} for r in records)
    header = ["paper row", "run", "paper S", "paper U", "paper h", "ours S", "ours U", "ours h", "seeds",
              "ours − paper S", "U", "h"]
    note = ("mIoU in %; ours: mean ± sample std over training seeds; the release's figures: ± the "
            "spread it states; * hIoU computed here from the paper's S and U.")
    if not sections:
        note = "No run of this config names a paper row (ablations: <row>: paper: [...])."
    (out / "paper.html").write_text(_html_page(
        [(title, header, body) for title, body in sections], "The paper beside ours", note))
    return records


def _html_page(tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[str]]]], title: str,
               note: str) -> str:
    """Several titled tables on one page."""
    parts = [f"<html><head><meta charset='utf-8'>{_STYLE}</head><body><h3>{html.escape(title)}</h3>",
             f"<p>{html.escape(note)}</p>"]
    for caption, header, rows in tables:
        parts.append(f"<h4>{html.escape(caption)}</h4>{_table(header, rows)}")
    return "".join(parts) + "</body></html>\n"


def build_report(
    results: Path,
    runs: Sequence[str],
    unseen: Sequence[str],
    examples: Path,
    out: Path,
    cross: Sequence[str] = (),
    ablations: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    main_run: str | None = None,
) -> list[dict]:
    """Every table and figure; `ablations`, `dataset` and `main_run` (the config's) place the
    paper's figures beside the runs (paper.{html,csv})."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_tables(results, runs, cross, out)
    per_run = [run_row(results, run) for run in runs]
    paper_tables_report(row_means(per_run, seed_groups(runs)), ablations, dataset, main_run, out)
    per_class_table(results, runs, unseen, out)
    curves_figure(results, [r for r in runs if r != "frozen_clip"], out)
    runtimes_table(results, out)
    copy_examples(examples, out)
    open_vocab_table(results, cross, out)
    return rows
