"""The report's tables and figures from fake stage outputs."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from cascade_clip.report import build_report


def _metrics(path, s, u, per_class):
    path.parent.mkdir(parents=True, exist_ok=True)
    h = 2 * s * u / (s + u)
    path.write_text(
        json.dumps(
            {
                "miou_seen": s,
                "miou_unseen": u,
                "hiou": h,
                "per_class_iou": per_class,
                "setting": "inductive",
                "num_images": 3,
            }
        )
    )


def test_build_report(tmp_path):
    res = tmp_path / "results"
    _metrics(res / "eval/frozen_clip/metrics.json", 20.0, 10.0, {"a": 20.0, "b": 10.0})
    _metrics(res / "eval/cascade/metrics.json", 80.0, 40.0, {"a": 80.0, "b": 40.0})
    (res / "runs/cascade").mkdir(parents=True)
    (res / "runs/cascade/log.jsonl").write_text(
        "\n".join(json.dumps({"step": i, "loss": 10.0 / i, "lr": 1e-3}) for i in range(1, 6))
    )
    (res / "benchmarks/train").mkdir(parents=True)
    (res / "benchmarks/train/cascade.tsv").write_text("s\th:m:s\tmax_rss\tcpu_time\n12.5\t0:00:12\t300\t20\n")
    examples = res / "eval/cascade/examples"
    examples.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(examples / "img0.png")
    out = tmp_path / "report"
    rows = build_report(res, ["frozen_clip", "cascade"], ["b"], examples, out)
    assert [r["run"] for r in rows] == ["frozen_clip", "cascade"]
    assert math.isclose(rows[1]["hiou"], 2 * 80 * 40 / 120)
    summary = (out / "summary.html").read_text()
    assert "80.0" in summary and "53.3" in summary
    assert "b *" in (out / "per_class.html").read_text()
    assert (out / "curves.png").stat().st_size > 0
    assert "12.5" in (out / "runtimes.html").read_text()
    assert (out / "examples/img0.png").exists()
    assert (out / "summary.csv").read_text().startswith("run,model,setting")


def test_missing_metrics_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="cascade/metrics.json"):
        build_report(tmp_path, ["cascade"], [], tmp_path, tmp_path / "out")
