"""Registry, SegmentationDataset modes and bad-input errors on a tiny dataset written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_clip.config import AugmentConfig
from cascade_clip.data import (
    DATASETS,
    IGNORE_INDEX,
    UNSEEN_INDEX,
    get_spec,
    load_classes,
    resolve_split,
)
from cascade_clip.data.dataset import SegmentationDataset
from cascade_clip.data.transforms import TrainTransform, denormalize

CLASSES = ["sky", "grass", "cat", "dog"]


def make_dataset(root: Path, labels: dict[str, np.ndarray], split: str = "train") -> Path:
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(
        {"name": "tiny", "classes": CLASSES, "image_suffix": ".png", "label_suffix": ".png"}))
    (root / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in labels))
    for i, (image_id, lab) in enumerate(labels.items()):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        rgb = np.random.default_rng(i).integers(0, 255, (*lab.shape, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "images" / split / f"{image_id}.png")
        Image.fromarray(lab.astype(np.uint8)).save(root / "labels" / split / f"{image_id}.png")
    return root


@pytest.fixture
def tiny(tmp_path) -> Path:
    a = np.array([[0, 0, 1, 1], [0, 2, 2, 1], [255, 2, 2, 1]], np.uint8)  # has cat
    b = np.array([[0, 0, 0, 0], [1, 1, 3, 3], [1, 1, 3, 255]], np.uint8)  # no cat
    c = np.array([[2, 2, 2, 2], [2, 2, 2, 2], [0, 0, 0, 0]], np.uint8)  # cat
    return make_dataset(tmp_path / "tiny", {"a": a, "b": b, "c": c})


# --- registry ---------------------------------------------------------------------------------


def test_registry_specs():
    assert set(DATASETS) == {"coco_stuff_164k", "voc12", "pascal_context_59", "shapes", "voc21",
                             "ade20k_150", "pascal_context_459", "ade20k_847"}
    coco, voc, ctx = DATASETS["coco_stuff_164k"], DATASETS["voc12"], DATASETS["pascal_context_59"]
    assert (len(coco.classes), len(voc.classes), len(ctx.classes)) == (171, 20, 59)
    assert voc.classes[0] == "aeroplane" and "background" not in voc.classes
    assert list(ctx.classes) == sorted(ctx.classes)
    assert ctx.classes[:3] == ("aeroplane", "bag", "bed") and ctx.classes[-1] == "wood"
    templates = (coco.templates, voc.templates, ctx.templates)
    assert templates == ("official-multi", "official-single", "official-multi")
    assert DATASETS["shapes"].templates == "shapes"
    for spec, n_unseen in ((coco, 15), (voc, 5), (ctx, 10)):
        seen, unseen = resolve_split(spec)
        assert len(unseen) == n_unseen and len(seen) + len(unseen) == len(spec.classes)
        assert [spec.classes[i] for i in unseen] == sorted(spec.unseen, key=spec.classes.index)


def test_open_vocab_suite_specs():
    """The suite's class lists, as the peers' converters count and order them."""
    from cascade_clip.data.registry import (
        ADE20K_847_IDS,
        CONTEXT_59_DETAIL_IDS,
        OPEN_VOCAB_SUITE,
        cross_eval_targets,
        download_folder,
        download_folders,
    )

    sizes = {name: len(DATASETS[name].classes) for name in OPEN_VOCAB_SUITE}
    assert sizes == {"ade20k_150": 150, "ade20k_847": 847, "pascal_context_459": 459, "pascal_context_59": 59,
                     "voc12": 20, "voc21": 21}
    for name in OPEN_VOCAB_SUITE:
        assert len(set(DATASETS[name].classes)) == len(DATASETS[name].classes), name
    ctx459 = DATASETS["pascal_context_459"].classes
    assert all(ctx459[cid - 1] == name for name, cid in CONTEXT_59_DETAIL_IDS)  # one Detail id scheme
    assert ctx459[:3] == ("accordion", "aeroplane", "air conditioner") and ctx459[-1] == "wool"
    assert DATASETS["voc21"].classes == ("background", *DATASETS["voc12"].classes)
    ade150 = DATASETS["ade20k_150"].classes
    assert ade150[:8] == ("wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed")
    assert ade150[-1] == "flag"
    assert ADE20K_847_IDS[0] == (2978, "wall") and ADE20K_847_IDS[-1][1].startswith("adding machine")
    assert len({i for i, _ in ADE20K_847_IDS}) == 847
    assert download_folder("voc21") == "voc12"
    assert download_folders("pascal_context_459") == ["pascal_context_459", "pascal_context_59"]
    raw = {"dataset": {"name": "coco_stuff_164k", "root": "data/coco"},
           "cross_eval": [{"dataset": "voc12", "root": "elsewhere/voc12"}], "workflow": {"open_vocab": True}}
    targets = cross_eval_targets(raw)
    assert targets["voc12"] == "elsewhere/voc12" and targets["ade20k_847"] == "data/ade20k_847"
    assert set(targets) == set(OPEN_VOCAB_SUITE)
    raw["workflow"]["open_vocab"] = False
    assert cross_eval_targets(raw) == {"voc12": "elsewhere/voc12"}


def test_resolve_split_unknown_name_is_an_error():
    with pytest.raises(ValueError, match=r"\['giraffee'\]"):
        resolve_split(DATASETS["coco_stuff_164k"], ["cow", "giraffee"])
    assert resolve_split(CLASSES, ["dog", "cat", "cat"]) == ([0, 1], [2, 3])
    with pytest.raises(ValueError, match="list of class names"):
        resolve_split(CLASSES, "cat")


def test_shapes_classes_from_dataset_json(tiny):
    assert load_classes(tiny) == tuple(CLASSES)
    meta = json.loads((tiny / "dataset.json").read_text())
    meta["unseen"] = ["cat"]
    (tiny / "dataset.json").write_text(json.dumps(meta))
    spec = get_spec("shapes", tiny)
    assert spec.classes == tuple(CLASSES) and spec.unseen == ("cat",)
    assert resolve_split(spec) == ([0, 1, 3], [2])
    with pytest.raises(ValueError, match="differ"):
        get_spec("voc12", tiny)


# --- modes ------------------------------------------------------------------------------------


def test_item_format_and_untouched_labels(tiny):
    ds = SegmentationDataset(tiny, "train", unseen=["cat"], mode="eval")
    item = ds[0]
    assert set(item) == {"image", "label", "id", "index"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 3, 4)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (3, 4)
    assert item["id"] == "a" and item["index"] == 0
    raw = np.array(Image.open(tiny / "images" / "train" / "a.png"))
    assert np.array_equal(denormalize(item["image"]), raw)
    assert item["label"].tolist() == [[0, 0, 1, 1], [0, 2, 2, 1], [255, 2, 2, 1]]
    full = SegmentationDataset(tiny, "train", unseen=["cat"], mode="fully_supervised")
    assert torch.equal(full[0]["label"], item["label"])


def test_inductive_hides_unseen(tiny):
    ds = SegmentationDataset(tiny, "train", unseen=["cat"], mode="inductive")
    assert ds.unseen_ids == [2] and ds.seen_ids == [0, 1, 3]
    assert len(ds) == 3
    for i in range(len(ds)):
        lab = ds[i]["label"]
        assert 2 not in lab and UNSEEN_INDEX not in lab
    assert ds[0]["label"][1].tolist() == [0, 255, 255, 1]


@pytest.mark.parametrize("with_index", [False, True])
def test_inductive_drops_images_with_unseen(tiny, with_index):
    if with_index:  # converters write this; ids not in it fall back to scanning labels
        (tiny / "splits" / "train.classes.json").write_text(
            json.dumps({"a": [0, 1, 2], "b": [0, 1, 3], "c": [0, 2]}))
    ds = SegmentationDataset(tiny, "train", unseen=["cat"], drop_unseen_images=True)
    assert ds.ids == ["b"] and ds.dropped == ["a", "c"]
    assert ds[0]["id"] == "b"
    trans = SegmentationDataset(tiny, "train", unseen=["cat"], mode="transductive",
                                drop_unseen_images=True)
    assert len(trans) == 3  # dropping is an inductive-only option


def test_transductive_marks_unseen(tiny):
    ds = SegmentationDataset(tiny, "train", unseen=["cat", "dog"], mode="transductive")
    assert ds[0]["label"][1].tolist() == [0, UNSEEN_INDEX, UNSEEN_INDEX, 1]
    assert ds[1]["label"][2].tolist() == [1, 1, UNSEEN_INDEX, IGNORE_INDEX]
    assert ds[2]["label"][2].tolist() == [0, 0, 0, 0]


def test_unseen_errors(tiny):
    with pytest.raises(ValueError, match=r"dataset\.json.*\['horse'\]"):
        SegmentationDataset(tiny, "train", unseen=["horse"])
    with pytest.raises(ValueError, match="unseen id 9"):
        SegmentationDataset(tiny, "train", unseen=[9])
    assert SegmentationDataset(tiny, "train", unseen=[2]).unseen_ids == [2]
    with pytest.raises(ValueError, match="unknown mode"):
        SegmentationDataset(tiny, "train", mode="semi")
    with pytest.raises(FileNotFoundError, match=r"splits/val\.txt"):
        SegmentationDataset(tiny, "val")


# --- bad input ----------------------------------------------------------------------------------


def test_missing_image_and_label(tiny):
    (tiny / "images" / "train" / "b.png").unlink()
    (tiny / "labels" / "train" / "c.png").unlink()
    ds = SegmentationDataset(tiny, "train")
    with pytest.raises(FileNotFoundError, match=r"images/train/b\.png: image not found"):
        ds[1]
    with pytest.raises(FileNotFoundError, match=r"labels/train/c\.png: label not found"):
        ds[2]


def test_unreadable_image(tiny):
    (tiny / "images" / "train" / "a.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"a\.png: unreadable image"):
        SegmentationDataset(tiny, "train")[0]


def test_label_with_bad_values(tiny):
    bad = np.array([[0, 7, 1, 1], [0, 2, 254, 1], [255, 2, 2, 1]], np.uint8)
    Image.fromarray(bad).save(tiny / "labels" / "train" / "a.png")
    msg = r"a\.png: label values \[7, 254\] are neither train ids 0\.\.3 nor 255"
    with pytest.raises(ValueError, match=msg):
        SegmentationDataset(tiny, "train")[0]


def test_label_size_and_mode(tiny):
    Image.fromarray(np.zeros((2, 4), np.uint8)).save(tiny / "labels" / "train" / "a.png")
    with pytest.raises(ValueError, match=r"a\.png: label size 4x2 differs from image size 4x3"):
        SegmentationDataset(tiny, "train")[0]
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tiny / "labels" / "train" / "b.png")
    with pytest.raises(ValueError, match=r"b\.png: label has mode 'RGB'"):
        SegmentationDataset(tiny, "train")[1]


def test_dataset_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        SegmentationDataset(tmp_path, "train")
    (tmp_path / "dataset.json").write_text('{"name": "x", "classes": []}')
    with pytest.raises(ValueError, match="missing key"):
        SegmentationDataset(tmp_path, "train")


# --- augmentation through the loader --------------------------------------------------------


def test_augmentation_is_a_function_of_seed_epoch_index(tiny):
    cfg = AugmentConfig(scale=(8, 6), ratio_range=(0.5, 2.0), crop_size=4)
    ds = SegmentationDataset(tiny, "train", transform=TrainTransform(cfg), seed=3)
    first = [ds[i]["image"] for i in range(3)]
    again = [ds[i]["image"] for i in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    ds.set_epoch(1)
    assert any(not torch.equal(x, ds[i]["image"]) for i, x in enumerate(first))
    assert all(x.shape == (3, 4, 4) for x in first)


def test_dataloader_workers_do_not_change_augmentation(tiny):
    from torch.utils.data import DataLoader

    from cascade_clip.data.transforms import worker_init_fn

    cfg = AugmentConfig(scale=(8, 6), crop_size=4)
    ds = SegmentationDataset(tiny, "train", transform=TrainTransform(cfg), seed=5)
    single = [b["image"] for b in DataLoader(ds, batch_size=1)]
    multi = [b["image"] for b in DataLoader(ds, batch_size=1, num_workers=2,
                                           worker_init_fn=worker_init_fn)]
    assert all(torch.equal(x, y) for x, y in zip(single, multi))


def test_loader_serves_the_shapes_world(tmp_path):
    shapes = pytest.importorskip("cascade_clip.data.shapes")
    root = shapes.generate_shapes(tmp_path / "shapes", seed=0, num_train=4, num_val=2,
                                  image_size=32, progress=False)
    spec = get_spec("shapes", root)
    assert spec.classes == tuple(DATASETS["shapes"].classes) and len(spec.classes) >= 15
    seen, unseen = resolve_split(spec)
    assert unseen and set(seen).isdisjoint(unseen)
    ind = SegmentationDataset(root, "train", unseen=spec.unseen, mode="inductive")
    trans = SegmentationDataset(root, "train", unseen=spec.unseen, mode="transductive")
    assert len(SegmentationDataset(root, "val", mode="eval")) == 2
    for i in range(len(ind)):
        raw = torch.from_numpy(ind.load_raw(i)[1].astype(np.int64))
        is_unseen = torch.isin(raw, torch.tensor(unseen))
        assert not torch.isin(ind[i]["label"], torch.tensor(unseen)).any()
        assert torch.equal(ind[i]["label"] == IGNORE_INDEX, is_unseen | (raw == IGNORE_INDEX))
        assert torch.equal(trans[i]["label"] == UNSEEN_INDEX, is_unseen)
    aug = SegmentationDataset(root, "train", unseen=spec.unseen,
                              transform=TrainTransform(AugmentConfig(scale=(64, 32), crop_size=32)))
    assert aug[0]["image"].shape == (3, 32, 32)
