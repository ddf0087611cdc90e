"""Bad input, in the real formats (issue 14): an archive missing a file, a label with an id
outside the class list, a truncated .mat file, unseen names that are not classes. Each is one
error naming the file or key, from the stage that reads it (download, prepare, split, or the
workflow as it starts), before any model runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from rehearsal.mirrors import (
    MirrorSpec,
    build_coco_stuff,
    build_context59,
    build_voc12,
    http_mirror,
    png_bytes,
    sbd_mat_bytes,
    write_sources,
)

from cascade_clip.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPEC = MirrorSpec(train=4, val=1)
VOC = "VOCdevkit/VOC2012"
SBD = "benchmark_RELEASE/dataset"


def download_and_prepare(tmp_path: Path, build, capsys, **edits) -> tuple[int, str, Path]:
    """Build one dataset's mirror with `edits` (overrides=, drop=), download it from a local
    server and prepare it; returns (prepare's exit code, its stderr, the download folder)."""
    mirror = build(tmp_path / "mirror", SPEC, **edits)
    with http_mirror(tmp_path / "mirror") as server:
        sources = write_sources(tmp_path / "sources.yaml", {mirror.name: mirror}, server.url)
        assert main(["download", "--dataset", mirror.name, "--root", str(tmp_path / "dl"),
                     "--sources", str(sources), "--no-progress"]) == 0
    capsys.readouterr()
    rc = main(["prepare", "--dataset", mirror.name, "--downloads", str(tmp_path / "dl"),
               "--out", str(tmp_path / "data")])
    err = capsys.readouterr().err
    return rc, err, tmp_path / "dl" / mirror.name


def one_error(err: str) -> str:
    """The CLI's one error line (progress bars aside)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0][lines[0].index("cascade-clip"):]


# --- an archive with a missing file ---------------------------------------------------------


@pytest.mark.parametrize("build, drop, names", [
    (build_coco_stuff, ["train2017/000000000025.jpg"],
     ["images/train2017/000000000025.jpg: image not found", "stuffthingmaps/train2017/000000000025.png"]),
    (build_voc12, [f"{VOC}/JPEGImages/2008_000003.jpg", f"{SBD}/img/2008_000003.jpg"],
     ["JPEGImages/2008_000003.jpg: image not found", "cls/2008_000003.mat"]),
    (build_context59, ["VOCdevkit/VOC2010/JPEGImages/2008_000200.jpg"],
     ["JPEGImages/2008_000200.jpg: image not found", "trainval_merged.json, image 2008000200"]),
    (build_voc12, [f"{VOC}/ImageSets/Segmentation/val.txt"],
     ["ImageSets/Segmentation/val.txt: split list not found"]),
    (build_voc12, [f"{SBD}/cls/2008_000002.mat"],
     ["SegmentationClass/2008_000002.png: label not found", "cls/2008_000002.mat"]),
], ids=["coco-image", "voc-image", "context-image", "voc-list", "sbd-label"])
def test_archive_missing_a_file_is_named(tmp_path, capsys, build, drop, names):
    rc, err, _ = download_and_prepare(tmp_path, build, capsys, drop=drop)
    assert rc == 2
    line = one_error(err)
    for name in names:
        assert name in line, line
    assert not (tmp_path / "data" / "dataset.json").exists()  # no finished conversion


# --- a label with an id outside the class list ------------------------------------------------


@pytest.mark.parametrize("build, member, value, message", [
    (build_coco_stuff, "stuffthingmaps/val2017/000000000139.png", 200,
     "stuffthingmaps/val2017/000000000139.png: values [200] are not COCO-Stuff ids"),
    (build_voc12, f"{VOC}/SegmentationClass/2007_000500.png", 21,
     "SegmentationClass/2007_000500.png: values [21] are not VOC class indices"),
], ids=["coco", "voc"])
def test_label_id_outside_the_class_list_is_named(tmp_path, capsys, build, member, value, message):
    label = np.zeros((SPEC.height, SPEC.width), np.uint8)
    label[5:9, 5:9] = value
    archive_member = member.removeprefix("stuffthingmaps/")  # the zip holds train2017/, val2017/
    data = png_bytes(label, palette=build is build_voc12)
    rc, err, _ = download_and_prepare(tmp_path, build, capsys, overrides={archive_member: data})
    assert rc == 2
    assert message in one_error(err)


def test_sbd_label_id_outside_the_class_list_is_named(tmp_path, capsys):
    seg = np.zeros((SPEC.height, SPEC.width), np.uint8)
    seg[0, 0] = 30
    rc, err, _ = download_and_prepare(tmp_path, build_voc12, capsys,
                                      overrides={f"{SBD}/cls/2008_000002.mat": sbd_mat_bytes(seg)})
    assert rc == 2
    assert "cls/2008_000002.mat: values [30] are not VOC class indices" in one_error(err)


def test_context_category_outside_the_detail_ids_is_ignored_not_an_error(tmp_path, capsys):
    """Detail categories outside the 59 are part of the format: they become 255."""
    rc, err, _ = download_and_prepare(tmp_path, build_context59, capsys)
    assert rc == 0, err


# --- a truncated .mat file ---------------------------------------------------------------------


def test_truncated_mat_is_named(tmp_path, capsys):
    whole = sbd_mat_bytes(np.ones((SPEC.height, SPEC.width), np.uint8))
    rc, err, _ = download_and_prepare(tmp_path, build_voc12, capsys,
                                      overrides={f"{SBD}/cls/2008_000002.mat": whole[: len(whole) // 2]})
    assert rc == 2
    assert "benchmark_RELEASE/dataset/cls/2008_000002.mat: unreadable .mat file" in one_error(err)


def test_truncated_archive_fails_its_checksum_at_download(tmp_path, capsys):
    """An archive cut short on the mirror (its published digest is the whole file's)."""
    mirror = build_voc12(tmp_path / "mirror", SPEC)
    with http_mirror(tmp_path / "mirror") as server:
        sources = write_sources(tmp_path / "sources.yaml", {"voc12": mirror}, server.url)
        tar = tmp_path / "mirror" / "VOCtrainval_11-May-2012.tar"
        tar.write_bytes(tar.read_bytes()[:-4096])
        rc = main(["download", "--dataset", "voc12", "--root", str(tmp_path / "dl"),
                   "--sources", str(sources), "--no-progress", "--retries", "0"])
    assert rc == 2
    line = one_error(capsys.readouterr().err)
    assert "VOCtrainval_11-May-2012.tar: sha256 checksum mismatch" in line


# --- unseen names that are not classes of the dataset ------------------------------------------


def test_split_names_the_config_key_and_the_name(tmp_path, capsys):
    rc, err, _ = download_and_prepare(tmp_path, build_voc12, capsys)
    assert rc == 0, err
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "x", "clip": {"model": "ViT-B-16-quickgelu", "pretrained": "random"},
        "dataset": {"name": "voc12", "root": str(tmp_path / "data"), "unseen": ["sheep", "tv monitor"]}}))
    assert main(["split", "--config", str(config), "--out", str(tmp_path / "split.json")]) == 2
    line = one_error(capsys.readouterr().err)
    assert f"{config}: dataset.unseen: ['tv monitor'] is not a class of voc12" in line
    assert not (tmp_path / "split.json").exists()


@pytest.mark.parametrize("config, bad", [("coco_stuff.yaml", "giraffee"), ("context.yaml", "tv monitor")])
def test_workflow_refuses_unknown_unseen_names_before_the_download(tmp_path, config, bad):
    """A registry dataset's classes are known before its download: the workflow stops as it
    starts, naming the key and the name, and runs no job."""
    cfg = yaml.safe_load((ROOT / "config" / config).read_text())
    cfg["dataset"]["unseen"] = cfg["dataset"]["unseen"][:-1] + [bad]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
           "--cores", "1", "--configfile", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert f"dataset.unseen: ['{bad}'] is not a class of {cfg['dataset']['name']}" in out
    assert "rule download" not in out and not (tmp_path / "resources").exists()
