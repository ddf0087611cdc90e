"""The report's tables and figures, read back from the files `build_report` and
`cascade-clip report` write, against fake stage outputs."""

from __future__ import annotations

import csv
import html
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from test_train import tiny_config, write_config

from cascade_clip.cli import main
from cascade_clip.metrics import summarize
from cascade_clip.report import build_report


class _Table(HTMLParser):
    """The cell texts of an HTML table, one list per <tr>."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def table(path) -> list[list[str]]:
    parser = _Table()
    parser.feed(path.read_text())
    return parser.rows


def _write_metrics(path, metrics: dict, **extra) -> None:
    """As evaluation writes metrics.json: NaN as null."""

    def safe(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        return {k: safe(x) for k, x in v.items()} if isinstance(v, dict) else v

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(safe({**metrics, "setting": "inductive", "num_images": 3, **extra})))


def _metrics(s, u, per_class):
    return {"miou_seen": s, "miou_unseen": u, "hiou": 2 * s * u / (s + u), "per_class_iou": per_class}


# The colour matplotlib draws a figure's first line in ("C0").
C0 = np.array([0x1F, 0x77, 0xB4])


def _extent(png, colour, tol=8) -> tuple[float, float]:
    """How far `colour` spreads across the left panel (the loss; the learning rate is on the
    right), as fractions of its width and height: a falling curve spans much of both, a
    legend swatch alone a few percent."""
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    left = pixels[:, : pixels.shape[1] // 2]
    ys, xs = np.nonzero(np.abs(left - colour).max(-1) <= tol)
    if not len(xs):
        return 0.0, 0.0
    return (xs.max() - xs.min()) / left.shape[1], (ys.max() - ys.min()) / left.shape[0]


def _results(tmp_path, log: bool = True):
    res = tmp_path / "results"
    _write_metrics(res / "eval/frozen_clip/metrics.json", _metrics(20.04, 10.0, {"a": 20.04, "b": 10.0}))
    _write_metrics(res / "eval/cascade/metrics.json", _metrics(80.0, 40.0, {"a": 80.0, "b": 40.0}))
    _write_metrics(res / "eval/cross/other/metrics.json", {**_metrics(30.0, 30.0, {}), "miou": 33.33})
    if log:
        (res / "runs/cascade").mkdir(parents=True)
        (res / "runs/cascade/log.jsonl").write_text(
            "\n".join(json.dumps({"step": i, "loss": 10.0 / i, "lr": 1e-3}) for i in range(1, 6))
        )
    header = "s\th:m:s\tmax_rss\tcpu_time\n"
    (res / "benchmarks/train").mkdir(parents=True)
    (res / "benchmarks/evaluate").mkdir(parents=True)
    # A benchmark file with two records (a rerun): the last one counts.
    train_tsv = header + "99.0\t0:01:39\t1\t1\n" + "12.5\t0:00:12\t300\t20\n"
    (res / "benchmarks/train/cascade.tsv").write_text(train_tsv)
    (res / "benchmarks/evaluate/cascade.tsv").write_text(header + "7.3\t0:00:07\t200\t9\n")
    examples = res / "eval/cascade/examples"
    examples.mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(examples / "img0.png")
    return res, examples


def test_build_report(tmp_path):
    res, examples = _results(tmp_path)
    out = tmp_path / "report"
    rows = build_report(res, ["frozen_clip", "cascade"], ["b"], examples, out, cross=["other"])
    assert [r["run"] for r in rows] == ["frozen_clip", "cascade", "cross:other"]

    # summary: one row per run, in order, labelled, each score in its column at 0.1
    assert table(out / "summary.html") == [
        ["model", "setting", "mIoU(S)", "mIoU(U)", "hIoU", "images"],
        ["frozen CLIP dense similarity (no decoder)", "inductive", "20.0", "10.0", "13.3", "3"],
        ["Cascade-CLIP (NGA, cascaded decoders)", "inductive", "80.0", "40.0", "53.3", "3"],
        ["main run evaluated on other (all classes seen)", "cross-dataset", "33.3", "n/a", "n/a", "3"],
    ]
    with open(out / "summary.csv") as f:
        records = list(csv.DictReader(f))
    assert [r["run"] for r in records] == ["frozen_clip", "cascade", "cross:other"]
    assert float(records[1]["miou_unseen"]) == 40.0 and float(records[0]["miou_seen"]) == 20.04
    assert records[2]["miou_seen"] == "33.33" and records[2]["hiou"] == ""

    # per class: unseen classes starred, one column per run
    assert table(out / "per_class.html") == [
        ["class (* unseen)", "frozen_clip", "cascade"],
        ["a", "20.0", "80.0"],
        ["b *", "10.0", "40.0"],
    ]

    # run times: stage named by its benchmark path, the last record, and the total
    assert table(out / "runtimes.html") == [
        ["stage", "wall time (s)", "peak RSS (MB)", "CPU time (s)"],
        ["evaluate/cascade", "7.3", "200", "9"],
        ["train/cascade", "12.5", "300", "20"],
        ["total (sum of stages)", "19.8", "", ""],
    ]

    # the loss panel draws the cascade run's loss (frozen_clip has no log, so no other line)
    width, height = _extent(out / "curves.png", C0)
    assert width > 0.5 and height > 0.4  # five steps, loss 10 -> 2 on a log axis
    assert (out / "examples/img0.png").read_bytes() == (examples / "img0.png").read_bytes()


def test_open_vocab_page_gives_both_rules_for_absent_classes(tmp_path):
    """A 459-class target's mIoU under both rules, from metrics.json as evaluation writes it;
    a target evaluated before both were recorded shows n/a for the second."""
    res, examples = _results(tmp_path)
    # 459 classes: 3 in the ground truth (IoU 60, 30, 0), 2 only predicted (IoU 0)
    confusion = np.zeros((459, 459), np.int64)
    confusion[0, 0], confusion[0, 3] = 6, 4  # class 0: 6 / 10
    confusion[1, 1], confusion[1, 4] = 3, 7  # class 1: 3 / 10
    confusion[2, 0] = 5  # class 2 never predicted: IoU 0; class 0 now 6 / 15
    names = [f"c{i}" for i in range(459)]
    _write_metrics(res / "eval/cross/pascal_context_459/metrics.json", summarize(confusion, names, []))
    out = tmp_path / "report"
    build_report(res, ["cascade"], ["b"], examples, out, cross=["other", "pascal_context_459"])
    rows = table(out / "open_vocab.html")
    assert rows[0][3:5] == ["mIoU: classes in ground truth or prediction",
                            "mIoU: classes in ground truth only"]
    assert rows[1][:5] == ["other", "0", "3", "33.3", "n/a"]
    assert rows[2][:5] == ["pascal_context_459", "459", "3", f"{(40 + 30) / 5:.1f}", f"{(40 + 30) / 3:.1f}"]
    with open(out / "summary.csv") as f:
        records = {r["run"]: r for r in csv.DictReader(f)}
    assert float(records["cross:pascal_context_459"]["miou_gt_only"]) == pytest.approx(70 / 3)


def test_open_vocab_page_sets_the_fields_figures_beside_ours(tmp_path):
    """Each target's row carries the field's figures for it (CAT-Seg, SAN: cascade_clip/data/
    field.yaml), n/a where an entry gives none; VOC-21 names its background protocol; every
    entry's source and protocol are listed under the table."""
    res, examples = _results(tmp_path)
    for dataset, miou in (("ade20k_847", 9.0), ("pascal_context_459", 15.0), ("voc21", 70.0)):
        extra = {"voc21_background": "catseg", "background_prompts": ["bag"]} if dataset == "voc21" else {}
        _write_metrics(res / f"eval/cross/{dataset}/metrics.json", {**_metrics(miou, miou, {}), "miou": miou},
                       **extra)
    out = tmp_path / "report"
    build_report(res, ["cascade"], ["b"], examples, out, cross=["ade20k_847", "pascal_context_459", "voc21"])
    rows = table(out / "open_vocab.html")
    assert rows[0][5:] == ["CAT-Seg ViT-B/16", "SAN ViT-B/16",
                           "SAN (its released model's evaluation log) ViT-B/16"]
    assert rows[1][:1] + rows[1][3:4] + rows[1][5:] == ["ade20k_847", "9.0", "12.0", "10.1", "10.2"]
    assert rows[2][:1] + rows[2][3:4] + rows[2][5:] == ["pascal_context_459", "15.0", "19.0", "12.6", "16.7"]
    assert rows[3][0] == "voc21 (background: CAT-Seg's (background = max over 39 Context names))"
    assert rows[3][3:4] + rows[3][5:] == ["70.0", "77.3", "n/a", "n/a"]
    text = (out / "open_vocab.html").read_text()
    assert "cvlab-kaist/CAT-Seg README.md, commit 6d3a188" in text and "voc20b protocol" in text


def test_curves_empty_without_logs(tmp_path):
    res, examples = _results(tmp_path, log=False)
    build_report(res, ["cascade"], ["b"], examples, tmp_path / "report")
    assert _extent(tmp_path / "report/curves.png", C0) == (0.0, 0.0)


def _no_unseen_results(tmp_path):
    """A run evaluated with `dataset.unseen: []`: no unseen mIoU, so no hIoU (both null)."""
    res = tmp_path / "results"
    confusion = np.array([[4, 1, 0], [0, 2, 0], [0, 0, 0]])  # "c" appears nowhere
    metrics = summarize(confusion, ["a", "b", "c"], [])
    assert math.isnan(metrics["miou_unseen"]) and math.isnan(metrics["hiou"])
    _write_metrics(res / "eval/cascade/metrics.json", metrics)
    assert json.loads((res / "eval/cascade/metrics.json").read_text())["miou_unseen"] is None
    (res / "split.json").write_text(json.dumps({"seen": ["a", "b", "c"], "unseen": []}))
    examples = res / "eval/cascade/examples"
    examples.mkdir(parents=True)
    return res, examples


def test_run_without_unseen_classes_shown_as_na(tmp_path):
    res, examples = _no_unseen_results(tmp_path)
    out = tmp_path / "report"
    rows = build_report(res, ["cascade"], [], examples, out)
    assert math.isnan(rows[0]["miou_unseen"]) and math.isnan(rows[0]["hiou"])
    # seen mIoU: a = 4/5, b = 2/3, c not scored -> (80 + 66.7) / 2
    assert table(out / "summary.html")[1] == [
        "Cascade-CLIP (NGA, cascaded decoders)",
        "inductive",
        "73.3",
        "n/a",
        "n/a",
        "3",
    ]
    assert table(out / "per_class.html")[1:] == [["a", "80.0"], ["b", "66.7"], ["c", "n/a"]]
    with open(out / "summary.csv") as f:
        (record,) = csv.DictReader(f)
    assert record["miou_unseen"] == "" and record["hiou"] == ""
    assert float(record["miou_seen"]) == pytest.approx(220 / 3)


def test_report_command_with_null_unseen(tmp_path, tiny_clip_config, capsys):
    res, examples = _no_unseen_results(tmp_path)
    config = write_config(tiny_config(tmp_path, tiny_clip_config), tmp_path / "config.yaml")
    out = tmp_path / "report"
    argv = ["report", "--config", str(config), "--results", str(res), "--runs", "cascade"]
    rc = main([*argv, "--examples", str(examples), "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    (line,) = [x for x in printed.out.splitlines() if x.startswith("Cascade-CLIP")]
    assert line.split()[-6:] == ["S", "73.3", "U", "n/a", "hIoU", "n/a"]
    assert (out / "summary.html").is_file()


def test_missing_metrics_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="cascade/metrics.json"):
        build_report(tmp_path, ["cascade"], [], tmp_path, tmp_path / "out")


def test_several_training_seeds_give_mean_and_std_and_a_per_seed_table(tmp_path):
    res, examples = _results(tmp_path)
    _write_metrics(res / "eval/cascade_seed1/metrics.json", _metrics(70.0, 50.0, {"a": 70.0, "b": 50.0}))
    out = tmp_path / "report"
    rows = build_report(res, ["frozen_clip", "cascade", "cascade_seed1"], ["b"], examples, out)
    assert [r["run"] for r in rows] == ["frozen_clip", "cascade"]
    h1, h2 = 2 * 80 * 40 / 120, 2 * 70 * 50 / 120
    hmean, hstd = (h1 + h2) / 2, abs(h1 - h2) / math.sqrt(2)
    assert table(out / "summary.html") == [
        ["model", "setting", "mIoU(S)", "mIoU(U)", "hIoU", "images", "seeds"],
        ["frozen CLIP dense similarity (no decoder)", "inductive", "20.0", "10.0", "13.3", "3", "1"],
        ["Cascade-CLIP (NGA, cascaded decoders)", "inductive", "75.0 ± 7.1", "45.0 ± 7.1",
         f"{hmean:.1f} ± {hstd:.1f}", "3", "2"],
    ]
    with open(out / "summary.csv") as f:
        records = {r["run"]: r for r in csv.DictReader(f)}
    assert float(records["cascade"]["miou_seen_std"]) == pytest.approx(math.sqrt(50))
    assert records["cascade"]["seeds"] == "2" and records["frozen_clip"]["miou_seen_std"] == ""
    assert [r[0] for r in table(out / "per_seed.html")[1:]] == ["frozen_clip", "cascade", "cascade_seed1"]


def _tables(path) -> dict[str, list[list[str]]]:
    """paper.html: caption (h4) -> the rows of the table under it."""
    import re

    text = path.read_text()
    out = {}
    for caption, body in re.findall(r"<h4>(.*?)</h4>(<table>.*?</table>)", text):
        parser = _Table()
        parser.feed(body)
        out[html.unescape(caption).split(" (source")[0]] = parser.rows
    return out


def test_paper_figures_beside_ours(tmp_path):
    """Runs that name paper rows: each paper table that has one, laid out as the paper's, the
    paper's S / U / h, ours (mean ± std, n) and ours - paper; the main run and its
    self-training run beside the paper's Table 2 (ZegCLIP's rows shown, not run here) and the
    release README's averages."""
    res, examples = _results(tmp_path)
    _write_metrics(res / "eval/cascade_seed1/metrics.json", _metrics(42.0, 44.0, {"a": 42.0, "b": 44.0}))
    _write_metrics(res / "eval/cascade/metrics.json", _metrics(40.0, 42.0, {"a": 40.0, "b": 42.0}))
    _write_metrics(res / "eval/single/metrics.json", _metrics(39.0, 38.0, {"a": 39.0, "b": 38.0}))
    _write_metrics(res / "eval/cascade_st/metrics.json", _metrics(41.0, 60.0, {"a": 41.0, "b": 60.0}),
                   setting="transductive")
    ablations = {"cascade": {"paper": ["t4.cascade_nga", "t9.independent"]},
                 "single": {"paper": "t4.no_cascade", "model.stages": [[12]]}}
    runs = ["frozen_clip", "cascade", "cascade_seed1", "single", "cascade_st"]
    out = tmp_path / "report"
    build_report(res, runs, ["b"], examples, out, ablations=ablations, dataset="coco_stuff_164k",
                 main_run="cascade")
    tables = _tables(out / "paper.html")
    assert list(tables) == [
        "Table 2: COCO-Stuff 164K (15 unseen) and PASCAL VOC 2012 (5 unseen), main results",
        "Main results as the release README gives them (averages of several training runs)",
        "Table 4: the cascade and NGA",
        "Table 9: shared or independent text embeddings (query projections)",
    ]
    t2, main, t4 = (tables[t] for t in list(tables)[:3])
    # Table 2's COCO-Stuff rows in its order: ZegCLIP's (no run), ours beside Cascade-CLIP's
    assert [r[:2] for r in t2[1:]] == [
        ["COCO-Stuff 164K: ZegCLIP", "not run here"], ["COCO-Stuff 164K: Cascade-CLIP", "cascade"],
        ["COCO-Stuff 164K: ZegCLIP + ST", "not run here"],
        ["COCO-Stuff 164K: Cascade-CLIP + ST", "cascade_st"]]
    assert t2[2][2:5] == ["41.1", "43.4", "42.2"] and t2[4][2:9] == ["41.7", "62.5", "50.0", "41.0", "60.0",
                                                                      "48.7", "1"]
    assert t2[4][9:] == ["-0.7", "-2.5", f"{2 * 41 * 60 / 101 - 50.0:+.1f}"]
    assert t4[0][:3] == ["paper row", "run", "paper S"]
    # the paper's order: no cascade first; ours mean ± std over two seeds; ours - paper
    assert t4[1] == ["no cascade, no NGA (one decoder, block 12)", "single", "40.1", "39.5", "39.8",
                     "39.0", "38.0", "38.5", "1", "-1.1", "-1.5", "-1.3"]
    h = (2 * 40 * 42 / 82 + 2 * 42 * 44 / 86) / 2
    assert t4[2][:8] == ["cascade + NGA", "cascade", "41.1", "43.4", "42.2", "41.0 ± 1.4", "43.0 ± 1.4",
                         f"{h:.1f} ± 1.4"]
    assert t4[2][8:] == ["2", "-0.1", "-0.4", f"{h - 42.2:+.1f}"]
    # the main results: the release's inductive and transductive rows, hIoU computed (*)
    assert [r[1] for r in main[1:]] == ["cascade", "cascade_st"]
    assert main[2][2:5] == ["41.7 ± 0.5", "62.5 ± 1.0", "50.0*"] and main[2][5:8] == ["41.0", "60.0", "48.7"]
    with open(out / "paper.csv") as f:
        records = list(csv.DictReader(f))
    assert [(r["paper_row"], r["run"]) for r in records] == [
        ("t2.coco_stuff_164k.cascade_clip", "cascade"), ("t2.coco_stuff_164k.cascade_clip_st", "cascade_st"),
        ("release.coco_stuff_164k.inductive", "cascade"),
        ("release.coco_stuff_164k.transductive", "cascade_st"),
        ("t4.no_cascade", "single"), ("t4.cascade_nga", "cascade"), ("t9.independent", "cascade")]
    assert float(records[4]["diff_S"]) == pytest.approx(-1.1)

    # Another dataset (the shapes miniature): the paper's rows beside ours, no difference.
    build_report(res, runs, ["b"], examples, out, ablations=ablations, dataset="shapes", main_run="cascade")
    t4 = _tables(out / "paper.html")["Table 4: the cascade and NGA"]
    assert t4[1][-3:] == ["other dataset"] * 3 and t4[1][2] == "40.1"
    build_report(res, ["cascade"], ["b"], examples, out)  # no ablations given: a page that says so
    assert "No run of this config names a paper row" in (out / "paper.html").read_text()
