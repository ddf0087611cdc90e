"""One validator: the workflow (Snakemake's schema validation + the Snakefile's call of the
CLI's checks) and every CLI stage accept exactly the same configs."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cascade_clip.cli import main
from cascade_clip.config import ConfigError, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())

# (dotted key, bad value, what the one-line error names)
BAD = [
    ("model.fusion", "magic", "model.fusion"),
    ("train.setting", "bogus", "train.setting"),
    ("train.log_interval", 0, "train.log_interval"),
    ("train.checkpoint_interval", 0, "train.checkpoint_interval"),
    ("train.iters", 0, "train.iters"),
    ("train.lr", "1e-3", "write 1.0e-3"),
    ("model.nga_sigma", 0, "model.nga_sigma"),
    ("self_train.start_fraction", 1.0, "self_train.start_fraction"),
    ("self_train.start_fraction", 0, "self_train.start_fraction"),
    ("clip.pretrained", None, "clip.pretrained"),
    ("clip.templates", "coco", "clip.templates"),
    ("model.cls_token", "twice", "model.cls_token"),
    ("dataset.unseen", "bogus-split", "dataset.unseen"),
    ("extra", {"a": 1}, "extra"),
    ("experiment", "a;rm -rf x", "experiment"),
    ("model.stages", [[3, 3]], "repeats a block"),  # cross-field: the CLI's _check
    ("evaluate.stride", 1000, "evaluate.stride"),  # cross-field: stride <= crop_size
]


def with_value(dotted: str, value: object) -> dict:
    data = copy.deepcopy(DEMO)
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return data


def workflow_accepts(data: dict) -> str | None:
    """What the Snakefile runs on the workflow's config; None if accepted, else the error."""
    from snakemake.utils import validate

    from cascade_clip.config import config_from_dict

    data = copy.deepcopy(data)
    try:
        validate(data, str(SCHEMA), set_default=True)
        config_from_dict(data, "the workflow config")
    except Exception as err:  # Snakemake raises WorkflowError, the CLI's checks ConfigError
        return str(err)
    return None


def cli_accepts(data: dict, tmp_path: Path, capsys) -> str | None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    rc = main(["split", "--config", str(path), "--out", str(tmp_path / "split.json")])
    err = capsys.readouterr().err.strip()
    return None if rc == 0 else err


@pytest.mark.parametrize("dotted, value, names", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_config_refused_by_workflow_and_cli_alike(dotted, value, names, tmp_path, capsys):
    data = with_value(dotted, value)
    assert workflow_accepts(data) is not None
    err = cli_accepts(data, tmp_path, capsys)
    assert err is not None and len(err.splitlines()) == 1 and names in err, err
    assert "c.yaml" in err


@pytest.mark.parametrize("name", ["config", "coco_stuff", "voc", "context"])
def test_shipped_configs_accepted_by_both(name, tmp_path):
    data = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    assert workflow_accepts(data) is None
    load_config(REPO / "config" / f"{name}.yaml")


def test_snakefile_applies_the_cli_checks(tmp_path):
    """Through snakemake itself: a config the schema alone would pass (a repeated block)
    stops the workflow before any job."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_value("model.stages", [[3, 3]])))
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and "repeats a block" in run.stdout + run.stderr


def test_set_into_an_empty_section_and_numbers_in_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**DEMO, "self_train": None}))
    cfg = load_config(path, parse_overrides(["self_train.iters=7", "train.lr=1e-3"]))
    assert cfg.self_train.iters == 7 and cfg.train.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"--set train.iters.x: train.iters is int, not a section"):
        load_config(path, {"train.iters.x": 1})


def test_cli_reports_bad_input_in_one_line_and_lets_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    import cascade_clip.commands.split as split_command

    assert main(["split", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "s.json")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.yaml: config file not found")

    def buggy(args):  # an internal error, even one of a type bad input also uses
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(split_command, "run", buggy)
    with pytest.raises(ValueError, match="internal invariant broken"):
        main(["split", "--config", str(REPO / "config" / "config.yaml"), "--out", str(tmp_path / "s.json")])
