"""The paper's figures (`cascade_clip/data/paper.yaml`) and how a run compares with them
(docs/design.md: The paper's experiments).

- `paper_rows()`: every row of the paper's tables by its stable id (`t4.cascade_nga`, ...);
- `main_result_rows(dataset, setting)`: what a main (or self-training) run stands beside: the
  paper's Cascade-CLIP row of Table 2 or 3, and the release README's average;
- `row_paper_ids(row)`, `row_overrides(row)`: an `ablations:` row's paper ids and its config
  overrides (the `paper` key is not a config key);
- `compare(...)`: whether the paper's direction between two rows holds in ours, within the
  seeds' spread;
- `field_entries()`: the field's open-vocabulary figures (`cascade_clip/data/field.yaml`), each
  with its source and protocol.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import yaml

from cascade_clip.errors import InputError
from cascade_clip.metrics import harmonic_iou

PAPER_KEY = "paper"  # the ablation-row key that names paper rows (not a config override)


@dataclass(frozen=True)
class PaperRow:
    id: str
    table: str
    label: str
    dataset: str
    setting: str
    S: float
    U: float
    h: float  # the table's, or 2SU/(S+U) when it gives none (h_computed)
    h_computed: bool
    source: str
    vs: str | None = None  # the row it is compared with (the table's reference by default)
    params_m: float | None = None
    S_spread: float | None = None
    U_spread: float | None = None
    grid: bool = True  # False: no config of this project runs it (paper.yaml says why)


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    source: str
    rows: tuple[str, ...]  # row ids in the paper's order
    show_all: bool = False  # the report shows every row of a run's dataset, matched or not


@functools.cache
def _load() -> tuple[dict[str, Any], dict[str, PaperTable], dict[str, PaperRow]]:
    data = yaml.safe_load(files("cascade_clip.data").joinpath("paper.yaml").read_text())
    tables: dict[str, PaperTable] = {}
    rows: dict[str, PaperRow] = {}
    for name, t in data["tables"].items():
        ids = []
        for r in t["rows"]:
            if r["id"] in rows or not r["id"].startswith(f"{name}."):
                raise InputError(f"paper.yaml: row id {r['id']!r} repeated or outside table {name}")
            h = r.get("h")
            vs = r.get("vs", t.get("reference"))
            rows[r["id"]] = PaperRow(
                id=r["id"], table=name, label=r["label"], dataset=r.get("dataset", t.get("dataset")),
                setting=r.get("setting", t.get("setting")), S=float(r["S"]), U=float(r["U"]),
                h=float(h) if h is not None else harmonic_iou(r["S"], r["U"]), h_computed=h is None,
                source=t["source"], vs=None if vs == r["id"] else vs, params_m=r.get("params_m"),
                S_spread=r.get("S_spread"), U_spread=r.get("U_spread"), grid=r.get("grid", True),
            )
            ids.append(r["id"])
        tables[name] = PaperTable(name, t["title"], t["source"], tuple(ids), bool(t.get("show_all")))
    return data["sources"], tables, rows


def paper_sources() -> dict[str, Any]:
    """source name -> {cite, how}."""
    return _load()[0]


def paper_tables() -> dict[str, PaperTable]:
    """table name -> its rows' ids, in the paper's order (file order)."""
    return _load()[1]


def paper_rows() -> dict[str, PaperRow]:
    """row id -> the row."""
    return _load()[2]


def paper_row(row_id: str) -> PaperRow:
    rows = paper_rows()
    if row_id not in rows:
        raise InputError(f"unknown paper row {row_id!r} (cascade_clip/data/paper.yaml has e.g. "
                         f"{', '.join(list(rows)[:3])})")
    return rows[row_id]


# The paper's table of each dataset's main results.
MAIN_RESULTS_TABLE = {"coco_stuff_164k": "t2", "voc12": "t2", "pascal_context_59": "t3"}


def main_result_rows(dataset: str, setting: str) -> list[PaperRow]:
    """What the main run (inductive) or its self-training run (transductive) of `dataset`
    stands beside: the paper's Cascade-CLIP row (Table 2 or 3), then the release README's
    average (table `release`); none for a dataset the paper does not report."""
    table = MAIN_RESULTS_TABLE.get(dataset)
    suffix = {"inductive": "", "transductive": "_st"}.get(setting)
    if table is None or suffix is None:
        return []
    rows = paper_rows()
    ids = [f"{table}.{dataset}.cascade_clip{suffix}", f"release.{dataset}.{setting}"]
    return [rows[i] for i in ids if i in rows]


# --- ablation rows -------------------------------------------------------------------------


def row_paper_ids(row: Mapping[str, Any] | None) -> list[str]:
    """The paper row ids an `ablations:` row names (`paper: id` or `paper: [id, ...]`)."""
    value = (row or {}).get(PAPER_KEY) or []
    return [value] if isinstance(value, str) else list(value)


def row_overrides(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """An `ablations:` row's config overrides (dotted keys), without its paper ids."""
    return {k: v for k, v in (row or {}).items() if k != PAPER_KEY}


def check_paper_ids(ablations: Mapping[str, Any] | None, where: str) -> None:
    """Every paper id an ablation row names exists (InputError naming the row otherwise)."""
    rows = paper_rows()
    for name, row in (ablations or {}).items():
        for row_id in row_paper_ids(row):
            if row_id not in rows:
                raise InputError(f"{where}: ablations.{name}.paper: unknown paper row {row_id!r} "
                                 "(cascade_clip/data/paper.yaml)")


# --- the paper's direction, in ours ----------------------------------------------------------


@dataclass(frozen=True)
class Direction:
    metric: str  # S | U | h
    paper: float  # row - other, the paper's
    ours: float  # row - other, mean over seeds
    spread: float  # the larger sample std of the two rows (NaN with one seed)
    verdict: str  # "holds", "reversed", "within spread", "paper level", "one seed", "not measured"


def compare(row: Mapping[str, float], other: Mapping[str, float], paper_row_: PaperRow,
            paper_other: PaperRow, metrics: Iterable[str] = ("S", "U", "h")) -> list[Direction]:
    """The paper's difference between two rows against ours, per metric.

    `row`, `other`: ours as {"S": mean, "S_std": std, ...}. A difference of ours counts only
    beyond the larger of the two rows' seed spreads (sample std): inside it the verdict is
    "within spread", whatever the paper says; beyond it, "holds" when its sign is the
    paper's and "reversed" when not. "paper level": the paper's rows are equal; "one seed":
    no spread to judge by."""
    out = []
    for m in metrics:
        paper = getattr(paper_row_, m) - getattr(paper_other, m)
        ours = row[m] - other[m]
        spread = max(row.get(f"{m}_std", math.nan), other.get(f"{m}_std", math.nan))
        if math.isnan(ours):
            verdict = "not measured"
        elif abs(paper) < 0.05:
            verdict = "paper level"
        elif math.isnan(spread):
            verdict = "one seed"
        elif abs(ours) <= spread:
            verdict = "within spread"
        else:
            verdict = "holds" if (ours > 0) == (paper > 0) else "reversed"
        out.append(Direction(m, paper, ours, spread, verdict))
    return out


# --- the field's open-vocabulary figures -----------------------------------------------------


@dataclass(frozen=True)
class FieldEntry:
    id: str
    method: str
    backbone: str
    source: str
    protocol: str
    miou: dict[str, float]  # target dataset -> mIoU (%); targets not given are absent


OPEN_VOCAB_TARGETS = ("ade20k_847", "pascal_context_459", "ade20k_150", "pascal_context_59", "voc12", "voc21")


@functools.cache
def field_entries() -> tuple[FieldEntry, ...]:
    """Other methods' open-vocabulary figures (COCO-Stuff-trained, every class seen), in file order."""
    data = yaml.safe_load(files("cascade_clip.data").joinpath("field.yaml").read_text())
    out = []
    for e in data["entries"]:
        unknown = sorted(set(e["miou"]) - set(OPEN_VOCAB_TARGETS))
        if unknown:
            raise InputError(f"field.yaml: entry {e['id']!r} names unknown targets {unknown}")
        out.append(FieldEntry(e["id"], e["method"], e["backbone"], " ".join(e["source"].split()),
                              " ".join(e["protocol"].split()), {k: float(v) for k, v in e["miou"].items()}))
    return tuple(out)
