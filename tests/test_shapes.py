"""The shapes world generator: determinism, on-disk format, captions, class vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade_clip.data import shapes


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return shapes.generate_shapes(
        tmp_path_factory.mktemp("shapes") / "w", seed=3, num_train=8, num_val=4, image_size=64, progress=False
    )


def test_vocabulary():
    classes = shapes.class_names()
    assert len(classes) >= 15 and len(set(classes)) == len(classes)
    unseen = shapes.default_unseen()
    assert len(unseen) >= 4 and set(unseen) <= set(classes)
    assert any(shapes.is_thing(u) for u in unseen) and any(not shapes.is_thing(u) for u in unseen)
    # every word of an unseen name also occurs in some seen name (language can compose it)
    seen_words = {w for c in classes if c not in unseen for w in c.split()}
    assert all(set(u.split()) <= seen_words for u in unseen)
    assert all("{}" in t for t in shapes.SHAPES_TEMPLATES)


def test_registry_and_templates_find_the_world():
    from cascade_clip.data import get_spec
    from cascade_clip.model.text import get_templates

    spec = get_spec("shapes")
    assert list(spec.classes) == shapes.class_names()
    assert list(spec.unseen) == shapes.default_unseen()
    assert get_templates("shapes") == tuple(shapes.SHAPES_TEMPLATES)


def test_format(world):
    meta = json.loads((world / "dataset.json").read_text())
    assert meta == {
        "name": "shapes",
        "classes": shapes.class_names(),
        "unseen": shapes.default_unseen(),
        "image_suffix": ".png",
        "label_suffix": ".png",
    }
    k = len(meta["classes"])
    for split, n in (("train", 8), ("val", 4)):
        ids = (world / "splits" / f"{split}.txt").read_text().split()
        assert len(ids) == n and len(set(ids)) == n
        records = [
            json.loads(line) for line in (world / "captions" / f"{split}.jsonl").read_text().splitlines()
        ]
        assert [r["id"] for r in records] == ids
        for rec in records:
            with Image.open(world / "images" / split / f"{rec['id']}.png") as im:
                assert im.mode == "RGB" and im.size == (64, 64)
            with Image.open(world / "labels" / split / f"{rec['id']}.png") as im:
                assert im.mode == "L" and im.size == (64, 64)
                label = np.asarray(im)
            values = set(np.unique(label).tolist())
            assert values <= set(range(k)) | {255}
            present = [meta["classes"][v] for v in sorted(values - {255})]
            assert rec["classes"] == present  # exactly the classes present, train-id order
            for name in present:
                assert name in rec["caption"]
            absent = set(meta["classes"]) - set(present)
            assert not any(f" {name}" in rec["caption"] for name in absent)


def test_deterministic(world, tmp_path):
    again = shapes.generate_shapes(
        tmp_path / "again", seed=3, num_train=8, num_val=4, image_size=64, progress=False
    )
    assert _files(again) == _files(world)
    # worker processes render the same files (every image is its own random stream)
    parallel = shapes.generate_shapes(
        tmp_path / "parallel", seed=3, num_train=8, num_val=4, image_size=64, progress=False, workers=2
    )
    assert _files(parallel) == _files(world)
    other = shapes.generate_shapes(
        tmp_path / "other", seed=4, num_train=8, num_val=4, image_size=64, progress=False
    )
    a, b = _files(world), _files(other)
    assert a.keys() == b.keys()
    assert a["images/train/train_000000.png"] != b["images/train/train_000000.png"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown unseen"):
        shapes.generate_shapes(
            tmp_path / "x", num_train=1, num_val=1, unseen=["pink elephant"], progress=False
        )
    with pytest.raises(ValueError, match="image_size"):
        shapes.generate_shapes(tmp_path / "x", num_train=1, num_val=1, image_size=8, progress=False)


def test_make_shapes_command(tmp_path, capsys):
    from cascade_clip.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "experiment: t\nseed: 1\ndataset: {name: shapes, root: unused}\n"
        "shapes: {num_train: 3, num_val: 2, image_size: 32}\n"
    )
    out = tmp_path / "world"
    assert main(["make-shapes", "--config", str(cfg), "--out", str(out)]) == 0
    assert len((out / "splits" / "train.txt").read_text().split()) == 3
    assert json.loads((out / "generator.json").read_text())["seed"] == 1
    cfg.write_text("experiment: t\ndataset: {name: shapes, root: unused}\nshapes: {bogus: 1}\n")
    assert main(["make-shapes", "--config", str(cfg), "--out", str(out)]) != 0
    assert "bogus" in capsys.readouterr().err


def test_four_disjoint_image_sets(tmp_path):
    """pretrain / train / val / test share no image, and adding pretrain and test leaves the
    train and val images byte-identical."""
    import hashlib

    root = shapes.generate_shapes(tmp_path / "w", seed=5, num_train=6, num_val=4, num_pretrain=6, num_test=4,
                                  image_size=32, progress=False)
    plain = shapes.generate_shapes(tmp_path / "plain", seed=5, num_train=6, num_val=4, image_size=32,
                                   progress=False)
    digests: dict[str, set[str]] = {}
    for split, n in (("pretrain", 6), ("train", 6), ("val", 4), ("test", 4)):
        files = sorted((root / "images" / split).glob("*.png"))
        assert len(files) == n and len((root / "splits" / f"{split}.txt").read_text().split()) == n
        digests[split] = {hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
        assert len(digests[split]) == n
    splits = list(digests)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not digests[a] & digests[b], (a, b)
    for split in ("train", "val"):
        for f in (plain / "images" / split).glob("*.png"):
            assert f.read_bytes() == (root / "images" / split / f.name).read_bytes()
    assert not (plain / "images" / "pretrain").exists()
