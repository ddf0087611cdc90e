"""The verdicts of the benchmark scripts, checked without a GPU (no timings here).

- ``kernels/aot_check.py`` without ``ptxas`` says "skipped: ptxas not found" and exits 3,
  never "all kernels compiled";
- ``benchmarks/gpu_session.sh`` runs every step even when one fails, and exits 1 naming the
  failed steps (each step's ``python3`` is a stub here, so the script runs in a second);
- ``benchmarks/shapes_transfer.py`` counts a missing time or score as a target not met.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import shapes_transfer  # noqa: E402


def test_aot_check_without_ptxas_is_skipped_not_ok(monkeypatch, capsys):
    import cascade_clip.kernels.aot_check as aot
    import cascade_clip.kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.setattr(aot, "find_ptxas", lambda arch: None)
    monkeypatch.setattr(aot, "compile_case", lambda *a: pytest.fail("compiled without ptxas"))
    rc = aot.main(["--arch", "90"])
    out = capsys.readouterr().out
    assert rc == aot.EXIT_SKIPPED and rc not in (aot.EXIT_OK, aot.EXIT_FAILED, aot.EXIT_INTERPRETING)
    assert "skipped: ptxas not found" in out
    assert "all kernels compiled" not in out and "\nok " not in out


def test_aot_check_finds_the_ptxas_triton_uses():
    pytest.importorskip("triton.backends.nvidia.compiler")
    import cascade_clip.kernels.aot_check as aot

    path = aot.find_ptxas(90)
    assert path is None or (os.path.isfile(path) and os.access(path, os.X_OK))


STUB = """#!/usr/bin/env bash
# python3 for gpu_session.sh: fails gpu_check.py, finds no tests in test_kernels.py
case "$*" in
  *gpu_check.py*) echo "stub: gpu_check failed"; exit 1 ;;
  *test_kernels.py*) echo "stub: no tests ran"; exit 5 ;;
  *) echo "stub ok: $*" >>"$STUB_LOG"; exit 0 ;;
esac
"""


@pytest.mark.skipif(shutil.which("timeout") is None, reason="gpu_session.sh needs coreutils timeout")
def test_gpu_session_runs_every_step_and_fails_at_the_end(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(STUB)
    (bin_dir / "python3").chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "stub.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SMOKE="1", OUT=str(out), TAIL="0",
               STUB_LOG=str(log))
    proc = subprocess.run(["bash", str(HERE / "gpu_session.sh")], cwd=HERE.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = (out / "failed_steps.txt").read_text().splitlines()
    assert failed == ["gpu_check (exit 1)", "tests_gpu (exit 5)"]
    assert "FAILED: 2 step(s)" in proc.stderr
    # the steps after the failed ones still ran
    ran = log.read_text()
    assert "bench_cache.py" in ran and "bench_train.py" in ran

    (bin_dir / "python3").write_text("#!/usr/bin/env bash\nexit 0\n")
    proc = subprocess.run(["bash", str(HERE / "gpu_session.sh")], cwd=HERE.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all steps passed" in proc.stdout and not (out / "failed_steps.txt").exists()


def _metrics(seen, unseen):
    return {"miou_seen": seen, "miou_unseen": unseen}


def test_shapes_transfer_missing_pretraining_time_is_not_met():
    metrics = {"cascade": _metrics(65.0, 40.0), "frozen_clip": _metrics(20.0, 10.0)}
    checks, ratio = shapes_transfer.target_checks(metrics, {"pretrain-clip": None}, total=500.0)
    assert ratio == 4.0
    assert checks["pre-training <= 240 s"] is False
    assert all(ok for name, ok in checks.items() if name != "pre-training <= 240 s")
    checks, _ = shapes_transfer.target_checks(metrics, {"pretrain-clip": 120.0}, total=500.0)
    assert all(checks.values())
    checks, _ = shapes_transfer.target_checks(metrics, {"pretrain-clip": 241.0}, total=601.0)
    assert not checks["pre-training <= 240 s"] and not checks["whole workflow <= 600 s"]


def test_shapes_transfer_null_scores_are_not_met():
    metrics = {
        "cascade": _metrics(65.0, None),
        "frozen_clip": _metrics(20.0, None),
        "cascade_st": _metrics(66.0, None),
    }
    checks, ratio = shapes_transfer.target_checks(metrics, {"pretrain-clip": 100.0}, total=500.0)
    assert ratio is None
    assert not checks["unseen mIoU >= 30"] and not checks["unseen >= 1.5x frozen"]
    assert not checks["self-training raises unseen"]
    assert checks["seen mIoU >= 60"]
    assert shapes_transfer._fmt(None, "7.1f") == "      -"


@pytest.mark.slow
def test_train_throughput_cpu_smoke_writes_every_figure(tmp_path):
    """benchmarks/train_throughput.py --cpu-smoke: the GPU script's whole flow at tiny size
    (real, synthetic and authors'-style steps, the projection), figures finite and positive."""
    import json
    import math
    import sys

    sys.path.insert(0, str(HERE))
    import train_throughput

    assert train_throughput.main(["--cpu-smoke", "--modes", "frozen", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "throughput.json").read_text())
    for variant in ("real", "synthetic", "authors"):
        it_s = results[f"frozen/{variant}"]["it_s"]
        assert math.isfinite(it_s) and it_s > 0
    hours = results["projection_4gpu_hours"]["frozen"]["COCO-Stuff"]
    assert hours["inductive_h"] == pytest.approx(80_000 / results["frozen/real"]["it_s"] / 3600)
    assert set(results["environment"]) >= {"torch", "triton", "device"}


def test_shapes_transfer_seed_table_means_over_seeds(tmp_path, capsys):
    """Several seeds: each row's mean over its <run>, <run>_seed<n> metrics, the targets
    checked on those means, every seed's values printed."""
    import json

    def write(run, s, u):
        path = tmp_path / "eval" / run / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"miou_seen": s, "miou_unseen": u, "hiou": 2 * s * u / (s + u)}))

    write("frozen_clip", 10.0, 10.0)
    for run, (a, b) in {"single_decoder": (50, 40), "cascade": (60, 30), "cascade_st": (62, 60)}.items():
        write(run, a, b)
        write(f"{run}_seed1", a + 2, b + 4)
    means = shapes_transfer.seed_table(tmp_path, [0, 1])
    assert means["cascade"]["miou_unseen"] == pytest.approx(32.0)
    assert means["frozen_clip"]["miou_seen"] == pytest.approx(10.0)
    out = capsys.readouterr().out
    assert "32.0 +-  2.8" in out and "cascade_seed1: 62.0 / 34.0" in out
