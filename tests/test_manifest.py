"""The prepared dataset's content manifests (cascade_clip.data.manifest)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cascade_clip.data.manifest import (
    check_manifest,
    dataset_files,
    manifest_path,
    read_manifest,
    write_manifests,
)
from cascade_clip.errors import InputError, MissingInputError


def _dataset(root: Path) -> Path:
    """A two-split dataset folder in the common layout (contents only need to be bytes)."""
    (root / "splits").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"name": "t", "classes": ["a", "b"]}))
    for split, ids in {"train": ["x", "y"], "val": ["z"]}.items():
        (root / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        (root / "splits" / f"{split}.classes.json").write_text("{}")
        for i in ids:
            for folder, suffix in (("images", ".jpg"), ("labels", ".png")):
                path = root / folder / split / f"{i}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f"{folder}-{split}-{i}".encode())
    return root


def test_one_manifest_per_split_holds_its_files_and_the_shared_ones(tmp_path):
    root = _dataset(tmp_path / "d")
    digests = write_manifests(root, progress=False)
    assert set(digests) == {"train", "val"}
    train = read_manifest(root, "train")
    assert set(train.files) == {
        "dataset.json", "splits/train.txt", "splits/train.classes.json",
        "images/train/x.jpg", "images/train/y.jpg", "labels/train/x.png", "labels/train/y.png",
    }
    assert train.digest == digests["train"]
    assert train.files["images/train/x.jpg"] == hashlib.sha256(b"images-train-x").hexdigest()
    assert "images/train/x.jpg" not in read_manifest(root, "val").files


def test_manifest_is_sha256sum_format(tmp_path):
    root = _dataset(tmp_path / "d")
    write_manifests(root, progress=False)
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum")
    done = subprocess.run(["sha256sum", "--check", "--quiet", "manifests/train.sha256"], cwd=root)
    assert done.returncode == 0


def test_a_changed_byte_changes_only_the_digest_of_the_split_that_reads_it(tmp_path):
    root = _dataset(tmp_path / "d")
    before = write_manifests(root, progress=False)
    (root / "labels" / "val" / "z.png").write_bytes(b"labels-val-Z")  # same size, one byte
    after = write_manifests(root, progress=False)
    assert after["train"] == before["train"]
    assert after["val"] != before["val"]
    (root / "dataset.json").write_text(json.dumps({"name": "t", "classes": ["a", "c"]}))
    assert write_manifests(root, progress=False)["train"] != before["train"]


def test_check_finds_changed_missing_and_extra_files(tmp_path):
    root = _dataset(tmp_path / "d")
    write_manifests(root, progress=False)
    assert check_manifest(root, "train", progress=False) == []
    (root / "images" / "train" / "x.jpg").write_bytes(b"images-train-X")
    (root / "labels" / "train" / "y.png").unlink()
    (root / "images" / "train" / "new.jpg").write_bytes(b"new")
    problems = check_manifest(root, "train", progress=False)
    assert len(problems) == 3
    assert any("x.jpg: content differs" in p for p in problems)
    assert any("y.png: missing" in p for p in problems)
    assert any("new.jpg: not in" in p for p in problems)
    assert check_manifest(root, "val", progress=False) == []


def test_verify_names_the_file(tmp_path):
    root = _dataset(tmp_path / "d")
    write_manifests(root, progress=False)
    manifest = read_manifest(root, "train")
    manifest.verify("images/train/x.jpg")
    manifest.verify(root / "images/train/x.jpg", b"images-train-x")
    with pytest.raises(InputError, match=r"x\.jpg: content differs"):
        manifest.verify("images/train/x.jpg", b"images-train-X")
    with pytest.raises(InputError, match=r"z\.jpg: not in"):
        manifest.sha256("images/val/z.jpg")


def test_missing_or_malformed_manifest_is_one_line(tmp_path):
    root = _dataset(tmp_path / "d")
    with pytest.raises(MissingInputError, match="no manifest for split 'train'"):
        read_manifest(root, "train")
    write_manifests(root, progress=False)
    manifest_path(root, "train").write_text("not a manifest line\n")
    with pytest.raises(InputError, match="line 1 is not"):
        read_manifest(root, "train")


def test_files_of_a_split_without_a_list_are_refused(tmp_path):
    root = _dataset(tmp_path / "d")
    (root / "images" / "test").mkdir()
    (root / "images" / "test" / "q.jpg").write_bytes(b"q")
    with pytest.raises(InputError, match=r"split\(s\) \['test'\]"):
        write_manifests(root, progress=False)


def test_manifests_folder_is_not_in_the_manifest(tmp_path):
    root = _dataset(tmp_path / "d")
    write_manifests(root, progress=False)
    assert not any(rel.startswith("manifests/") for rel in dataset_files(root))
