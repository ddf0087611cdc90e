"""A crash loses no work: kill the tiny workflow (Snakemake and its training process) after
the half-way checkpoint, move the data to another folder, recover as Snakemake tells a user to
(`--unlock`, then `--rerun-incomplete`), and the run resumes from its last checkpoint, the
half-way checkpoint holds the half-way weights, and the log keeps every step. A rerun after
the data was regenerated trains again: it never hands back the old weights.

The same workflow holds a second frozen row, `online`, with `cache.enabled: false`: it
trains from the images with the frozen encoder run every step, beside the cached main run."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from test_workflow import ROOT, _tiny_config, snakemake

ITERS, HALF, EVERY = 300, 150, 50


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as a crash or an OOM kill would."""
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:  # not there yet, or being replaced
        return -1


@pytest.mark.slow
def test_killed_workflow_resumes_without_losing_work(tmp_path):
    """Also the whole tiny workflow in folders whose names have spaces and a quote (working
    directory, results, resources): every stage's command gets them whole. And a second row
    that taps a block outside the config's stages trains from the one feature cache, which
    holds every block the rows tap; the report sets the paper row it names beside it."""
    work = tmp_path / "work dir"
    work.mkdir()
    results = tmp_path / "my results"
    cfg = _tiny_config(results, tmp_path / "it's resources")
    cfg["train"].update(iters=ITERS, log_interval=1, checkpoint_interval=EVERY)
    cfg["self_train"] = {"iters": 4, "start_fraction": HALF / ITERS}
    cfg["workflow"]["self_train"] = True
    cfg["ablations"]["online"] = {"cache.enabled": False, "train.iters": 4, "train.checkpoint_interval": 2}
    # blocks 2 and 6 (the config's stages tap 3-6), a few steps: beside the killed run
    cfg["ablations"]["early"] = {"paper": "t6.9-11_12", "model.stages": [[2], [6]], "train.iters": 4}
    (work / "config").mkdir()
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = results / "shapes" / "runs" / "cascade"

    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work)]
    proc = subprocess.Popen([*cmd, "--cores", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = -1
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            killed_at = _step(run / "ckpt_last.pt")
            if HALF < killed_at < ITERS:
                break
            time.sleep(0.02)
    finally:
        kill_tree(proc.pid)  # snakemake and every job it started (they run in their own groups)
        proc.wait()
    assert HALF < killed_at < ITERS, f"did not catch the run between its checkpoints (last {killed_at})"
    assert not (run / "model_final.pt").exists()

    # The data moves to another folder (dataset.root edited): Snakemake reruns every stage that
    # reads it; they give the same CLIP, text and features, so the run resumes.
    moved = tmp_path / "moved data" / "shapes"
    shutil.move(cfg["dataset"]["root"], moved)
    cfg["dataset"]["root"] = str(moved)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert snakemake("--unlock", cwd=work).returncode == 0
    res = snakemake("--cores", "2", "--rerun-incomplete", cwd=work)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(results.rglob("*.log")))
    assert res.returncode == 0, res.stderr[-4000:] + logs

    assert _step(run / "ckpt_half.pt") == HALF
    assert _step(run / "model_final.pt") == ITERS
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, ITERS + 1))  # every step once, from before and after the crash
    resumes = [r for r in records if r.get("event") == "resume"]
    assert len(resumes) == 1 and HALF < resumes[0]["step"] <= killed_at
    assert (results / "shapes" / "runs" / "cascade_st" / "model_final.pt").is_file()
    # the frozen row without a cache: trained online (`train` refuses --cache with
    # cache.enabled: false, so it was never given one), evaluated, reported
    online = yaml.safe_load((results / "shapes" / "runs" / "online" / "config.yaml").read_text())
    assert online["model"]["encoder_mode"] == "frozen" and online["cache"]["enabled"] is False
    assert _step(results / "shapes" / "runs" / "online" / "model_final.pt") == 4
    for name in ("frozen_clip", "cascade", "cascade_st", "online"):
        metrics = json.loads((results / "shapes" / "eval" / name / "metrics.json").read_text())
        assert math.isfinite(metrics["hiou"]) and metrics["num_images"] == 4, name
    assert (results / "shapes" / "report" / "summary.csv").is_file()
    from cascade_clip.cache.index import open_layout

    exp = results / "shapes"
    assert open_layout(exp / "cache" / "train.h5").blocks == [2, 3, 4, 5, 6]  # one cache, every row's blocks
    early = json.loads((exp / "eval" / "early" / "metrics.json").read_text())
    assert math.isfinite(early["hiou"]) and _step(exp / "runs" / "early" / "model_final.pt") == 4
    assert "Table 6: the number of cascaded decoders" in (exp / "report" / "paper.html").read_text()
    assert not list(tmp_path.rglob("INJECTED"))

    # The world is generated anew (another shapes setting; the moved world has no Snakemake
    # record to see the edit by, so it is asked for): the run trains again on it.
    before = torch.load(run / "model_final.pt", weights_only=True)["model"]
    cfg["shapes"]["max_things"] = 1
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake("--cores", "2", "--forcerun", "make_shapes", str(run / "model_final.pt"), cwd=work)
    assert res.returncode == 0, res.stderr[-4000:]
    after = torch.load(run / "model_final.pt", weights_only=True)["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, ITERS + 1))
    assert not [r for r in records if r.get("event") == "resume"]
