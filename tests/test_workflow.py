"""The Snakemake workflow: every config resolves its DAG, lint is clean, bad configs stop."""

from __future__ import annotations

import re
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


# The ablation grids hold their base configs' rows unchanged (tests/test_paper.py), so their
# DAGs are the bases' and more: coco_stuff.yaml and voc.yaml are dry-run as their grids.
DRY_RUN = [c for c in CONFIGS if c.stem not in ("coco_stuff", "voc")]


@pytest.mark.parametrize("config", DRY_RUN, ids=[c.stem for c in DRY_RUN])
def test_dry_run_resolves_whole_dag(config, tmp_path):
    """Every stage, every ablation row (x workflow.seeds) trained and evaluated, one feature
    cache holding every block the frozen rows tap; the demo as the default config."""
    if config.name == "config.yaml":  # no --configfile: the embedded default
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "config.yaml").write_text(config.read_text())
        res = snakemake("-n", "-p", "--cores", "4", "--resources", "gpu=4", cwd=tmp_path)
    else:
        res = snakemake("-n", "-p", "--cores", "4", "--resources", "gpu=4", "--configfile", str(config),
                        cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    for rule in ("split", "text_embeddings", "train", "evaluate", "evaluate_frozen_clip", "report"):
        assert f"rule {rule}:" in out or f"\n{rule} " in out, rule
    data = yaml.safe_load(config.read_text())
    if data["dataset"]["name"] == "shapes":
        assert "make_shapes" in out and "pretrain_clip" in out
    else:
        assert "download" in out and "prepare_" in out
    exp, seeds = data["experiment"], data["workflow"].get("seeds") or [None]
    for row in data["ablations"]:
        for run in [row] + [f"{row}_seed{s}" for s in seeds[1:]]:
            assert f"results/{exp}/runs/{run}/model_final.pt" in out, run
            assert f"results/{exp}/eval/{run}/metrics.json" in out, run
    cache = [c for c in _shell_commands(out) if "cascade-clip cache-features" in c]
    stages = [re.search(r"model\.stages=(\[\[[0-9, ]+\]\])", c) for c in cache]
    if config.stem == "shapes_ablations":  # its rows tap blocks 1-6, its stages 3-6: one cache of all
        assert [yaml.safe_load(m.group(1)) for m in stages] == [[[1, 2, 3, 4, 5, 6]]]
    else:  # the frozen rows tap the config's blocks or fewer: the cache is the config's
        assert stages == [None] * len(cache)
    if config.stem == "coco_stuff_ablations":  # four shard jobs, a GPU each; training on 4 GPUs
        assert out.count("rule cache_shard:") == 4
        assert "cascade-clip gpu-run --gpus 1 -- cascade-clip cache-features" in out
        assert "torchrun --standalone --nproc-per-node 4" in out
    if config.name == "config.yaml":  # the CPU demo: one process a job, no torchrun launcher
        shells = _shell_commands(out)
        assert [c for c in shells if "cascade-clip gpu-run --gpus 0 -- cascade-clip train" in c]
        assert [c for c in shells if "cascade-clip gpu-run --gpus 0 -- cascade-clip evaluate" in c]
        assert not [c for c in shells if "torchrun" in c]


def test_real_config_does_not_inherit_the_demo(tmp_path):
    res = snakemake("-n", "--cores", "2", "--configfile", str(ROOT / "config" / "voc.yaml"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    resolved = yaml.safe_load((tmp_path / "results" / "voc12" / "config.yaml").read_text())
    assert resolved["clip"]["model_config"] is None
    assert resolved["clip"]["pretrained"] == "openai"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(bogus_key=1), "bogus_key"),
        (lambda c: c["model"].update(fusion="magic"), "magic"),
        (lambda c: c["train"].update(itres=5), "itres"),
        (lambda c: c["dataset"].update(name="imagenet"), "imagenet"),
        # Names that become folders, wildcards and CLI words: no shell metacharacters.
        (lambda c: c.update(experiment="x;touch y"), "x;touch y"),
        (lambda c: c.update(experiment=".."), "'..'"),
        (lambda c: c["ablations"].update({"two words": {}}), "two words"),
        (lambda c: c["ablations"].update({"a|b": {}}), "a|b"),
        (lambda c: c["workflow"].update(main_run="$(id)"), "$(id)"),
        (lambda c: c["dataset"].update(val_split="val;ls"), "val;ls"),
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


# --- shell quoting: paths with spaces and shell metacharacters -----------------------------

HOSTILE = "res dir;touch INJECTED"  # a space and a `;` that must never reach the shell raw


def _shell_commands(output: str) -> list[str]:
    """The commands `snakemake -n -p` prints, one string each."""
    return [line.split("Shell command:", 1)[1].strip() for line in output.splitlines()
            if "Shell command:" in line]


@pytest.mark.parametrize("config", ["config.yaml", "coco_stuff.yaml"])
def test_dry_run_quotes_paths_with_spaces_and_semicolons(config, tmp_path):
    """Every config path reaches the shell as one quoted word: a space does not split it and a
    `;` does not end the command (the shapes demo's stages, and downloads / prepare /
    cross-dataset evaluation in the COCO config)."""
    import shlex

    cfg = yaml.safe_load((ROOT / "config" / config).read_text())
    results = tmp_path / HOSTILE
    cfg["results_dir"] = str(results)
    cfg.setdefault("workflow", {})["downloads_dir"] = str(tmp_path / "down loads;x")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "-p", "--cores", "2", "--configfile", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    commands = _shell_commands(res.stdout + res.stderr)
    assert len(commands) >= 8
    for command in commands:
        words = shlex.split(command)
        assert "touch" not in words and "INJECTED" not in words, command
        for word in words:
            for hostile in (str(results), str(tmp_path / "down loads;x")):
                if hostile.split(" ")[0] in word:  # the folder's first half: the whole word
                    assert hostile in word, (word, command)
    text = "\n".join(commands)
    assert f"--config {shlex.quote(str(results / cfg['experiment'] / 'config.yaml'))}" in text
    if config == "coco_stuff.yaml":
        # One download root: `download --root R` fills R/<dataset>/ and `prepare` reads R.
        quoted = shlex.quote(str(tmp_path / "down loads;x"))
        assert f"--root {quoted} " in text and f"--downloads {quoted} " in text
        assert "cascade-clip prepare --dataset voc12" in text


def test_every_shell_field_is_quoted():
    """A static guard for new rules: every `{...}` in a rule's shell command is written `:q`,
    except the launcher's own shell text (integers and fixed words only)."""
    import re

    unquoted = []
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        in_shell = False
        for number, line in enumerate(smk.read_text().splitlines(), start=1):
            stripped = line.strip()
            if stripped == "shell:":
                in_shell = True
                continue
            if in_shell and not stripped.startswith('"'):
                in_shell = False
            if in_shell:
                for field in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", stripped):
                    if not field.endswith(":q") and field != "params.launch":
                        unquoted.append(f"{smk.name}:{number}: {{{field}}}")
    assert unquoted == []


def _tiny_config(results_dir: Path, resources: Path) -> dict:
    """config/config.yaml shrunk to seconds: a small world at 64 px, a 6-block CLIP of width 32
    with its own tiny text tower, a few steps of everything, one run, no self-training; results
    and resources (world, CLIP) in the given folders, as absolute paths."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["results_dir"] = str(results_dir)
    cfg["dataset"]["root"] = str(resources / "data" / "shapes")
    cfg["clip"]["pretrained"] = str(resources / "clip" / "checkpoint.pt")
    cfg["clip"]["model_config"] = str(resources / "clip" / "model_config.json")
    cfg["shapes"] = dict(cfg.get("shapes") or {}, num_pretrain=12, num_train=12, num_val=4, num_test=4,
                         image_size=64)
    cfg["pretrain"] = dict(cfg.get("pretrain") or {}, image_size=64, width=32, heads=2, embed_dim=32,
                           text="own", text_width=32, text_layers=1, steps=2, batch_size=8,
                           warmup_steps=1, max_seconds=10, log_interval=1)
    cfg["clip"]["image_size"] = 64
    cfg["model"]["decoder"] = dict(cfg["model"].get("decoder") or {}, layers=1, heads=2, ffn_dim=32)
    cfg["train"].update(iters=4, batch_size=4, warmup_iters=1, log_interval=2, checkpoint_interval=2,
                        num_workers=0)
    cfg["train"]["augment"] = dict(cfg["train"].get("augment") or {}, scale=[128, 64], crop_size=64)
    cfg["evaluate"] = dict(cfg.get("evaluate") or {}, crop_size=64, stride=48, short_side=64,
                           num_visualize=1)
    cfg["ablations"] = {"cascade": {}}
    cfg["workflow"] = dict(cfg.get("workflow") or {}, self_train=False, threads=1, cache_threads=1)
    return cfg


def test_seeds_run_every_row_once_per_training_seed(tmp_path):
    """workflow.seeds: each ablation row and self-training once per seed (train.seed), the
    first seed under the row's own name; self-training of a seed starts from its main run."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["workflow"]["seeds"] = [0, 3]
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "-p", "--cores", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    for run in ("cascade", "cascade_seed3", "single_decoder", "single_decoder_seed3", "cascade_st",
                "cascade_st_seed3"):
        assert f"runs/{run}/model_final.pt" in out and f"eval/{run}/metrics.json" in out, run
    commands = [line for line in out.splitlines() if "cascade-clip train" in line]  # one process each
    assert len(commands) == 6
    st3 = [c for c in commands if "runs/cascade_st_seed3" in c]
    assert len(st3) == 1 and "train.seed=3" in st3[0] and "runs/cascade_seed3/ckpt_half.pt" in st3[0]
    assert sum("train.seed=0" in c for c in commands) == 3
