"""The Snakemake workflow: every config resolves its DAG, lint is clean, bad configs stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(cwd), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_dry_run_resolves_whole_dag(config, tmp_path):
    res = snakemake("-n", "--cores", "4", "--resources", "gpu=4", "--configfile", str(config), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    for rule in ("split", "text_embeddings", "train", "evaluate", "evaluate_frozen_clip", "report"):
        assert f"rule {rule}:" in out or f"\n{rule} " in out, rule
    data = yaml.safe_load(config.read_text())
    if data["dataset"]["name"] == "shapes":
        assert "make_shapes" in out and "pretrain_clip" in out
    else:
        assert "download" in out and "prepare_" in out


def test_dry_run_defaults_to_shapes(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((ROOT / "config" / "config.yaml").read_text())
    res = snakemake("-n", "--cores", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "make_shapes" in res.stdout + res.stderr


def test_real_config_does_not_inherit_the_demo(tmp_path):
    res = snakemake("-n", "--cores", "2", "--configfile", str(ROOT / "config" / "voc.yaml"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    resolved = yaml.safe_load((tmp_path / "results" / "voc12" / "config.yaml").read_text())
    assert resolved["clip"]["model_config"] is None
    assert resolved["clip"]["pretrained"] == "openai"


def test_shard_jobs_each_take_a_gpu(tmp_path):
    # coco_stuff runs vpt by default (no cache); ask for the frozen fast path instead.
    cfg = yaml.safe_load((ROOT / "config" / "coco_stuff.yaml").read_text())
    cfg["model"]["encoder_mode"] = "frozen"
    path = tmp_path / "frozen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = snakemake(
        "-n", "-p", "--cores", "8", "--resources", "gpu=4", "--configfile", str(path), cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert out.count("rule cache_shard:") == 4
    assert "cascade-clip gpu-run --gpus 1 -- cascade-clip cache-features" in out
    assert "torchrun --standalone --nproc-per-node 4" in out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(bogus_key=1), "bogus_key"),
        (lambda c: c["model"].update(fusion="magic"), "magic"),
        (lambda c: c["train"].update(itres=5), "itres"),
        (lambda c: c["dataset"].update(name="imagenet"), "imagenet"),
    ],
)
def test_broken_config_is_rejected_by_name(tmp_path, edit, message):
    cfg = yaml.safe_load((ROOT / "config" / "coco_stuff.yaml").read_text())
    edit(cfg)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "--cores", "1", "--configfile", str(path), cwd=tmp_path)
    assert res.returncode != 0
    assert message in res.stdout + res.stderr


def test_lint_is_clean(tmp_path):
    res = snakemake("--lint", "--configfile", str(ROOT / "config" / "config.yaml"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "Lints for" not in res.stdout + res.stderr, res.stdout[-3000:]


def test_every_config_passes_the_package_check():
    """The CLI's dataclasses accept exactly what the schema accepts for the shipped configs."""
    from cascade_clip.config import load_config

    for config in CONFIGS:
        load_config(config)
