"""Your own data (issue 27): `cascade-clip prepare --dataset folder | coco` writes the common
format, and refuses bad input one file at a time, each in one line naming the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rehearsal.mirrors import jpeg_bytes, png_bytes

from cascade_clip.cli import main
from cascade_clip.data import SegmentationDataset

CLASSES = ["bolt", "nut", "washer", "gear", "spring"]
H, W = 24, 32


def label_grid(seed: int, num_classes: int = len(CLASSES)) -> np.ndarray:
    """(H, W) uint8: 4x4 cells of class ids (every class present), a strip of 255."""
    cells = np.random.default_rng(seed).permutation(np.arange(24) % num_classes).reshape(4, 6)
    label = np.kron(cells, np.ones((6, 6), np.int64)).astype(np.uint8)[:H, :W]
    label[0, :] = 255
    return label


def make_folder(root: Path, n: int = 6, lists: bool = True) -> dict[str, Path]:
    """A clean folder dataset: images/, masks/ (same stems), classes.txt, train/val lists."""
    for k in range(n):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "images" / f"part_{k:02d}.jpg").write_bytes(jpeg_bytes(H, W, k))
        (root / "masks").mkdir(parents=True, exist_ok=True)
        (root / "masks" / f"part_{k:02d}.png").write_bytes(png_bytes(label_grid(k)))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    paths = {"images": root / "images", "masks": root / "masks", "classes": root / "classes.txt"}
    if lists:
        (root / "train.txt").write_text("".join(f"part_{k:02d}\n" for k in range(n - 2)))
        (root / "val.txt").write_text("".join(f"part_{k:02d}.jpg\n" for k in range(n - 2, n)))
        paths.update(train=root / "train.txt", val=root / "val.txt")
    return paths


def prepare_folder(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    argv = ["prepare", "--dataset", "folder", "--images", str(paths["images"]), "--masks",
            str(paths["masks"]), "--classes", str(paths["classes"]), "--out", str(out), "--name", "parts",
            *extra]
    for split in ("train", "val"):
        if split in paths:
            argv += ["--split", f"{split}={paths[split]}"]
    return argv


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(err) == 1, err
    return err[0]


def test_folder_dataset_to_the_common_format(tmp_path):
    paths = make_folder(tmp_path / "mine")
    out = tmp_path / "data" / "parts"
    assert main(prepare_folder(paths, out)) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta == {"name": "parts", "classes": CLASSES, "image_suffix": ".jpg", "label_suffix": ".png"}
    assert (out / "splits" / "train.txt").read_text().split() == [f"part_{k:02d}" for k in range(4)]
    assert (out / "splits" / "val.txt").read_text().split() == ["part_04", "part_05"]
    for k in range(6):
        split = "train" if k < 4 else "val"
        with Image.open(out / "labels" / split / f"part_{k:02d}.png") as im:
            assert im.mode == "L" and np.array_equal(np.array(im), label_grid(k))
    ds = SegmentationDataset(out, "train", unseen=["gear"], mode="inductive")
    assert ds.unseen_ids == [3] and 3 not in ds[0]["label"].unique().tolist()


def test_folder_without_lists_holds_out_every_nth_image(tmp_path):
    paths = make_folder(tmp_path / "mine", n=6, lists=False)
    out = tmp_path / "out"
    assert main(prepare_folder(paths, out, "--val-fraction", "0.34")) == 0  # every 3rd
    assert (out / "splits" / "val.txt").read_text().split() == ["part_02", "part_05"]
    assert len((out / "splits" / "train.txt").read_text().split()) == 4


def test_folder_with_one_subfolder_per_split(tmp_path):
    root = tmp_path / "mine"
    for split, ks in (("train", range(3)), ("val", range(3, 5))):
        for k in ks:
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "images" / split / f"p{k}.jpg").write_bytes(jpeg_bytes(H, W, k))
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split / f"p{k}.png").write_bytes(png_bytes(label_grid(k)))
    (root / "classes.txt").write_text("\n".join(CLASSES))
    out = tmp_path / "out"
    assert main(prepare_folder({"images": root / "images", "masks": root / "masks",
                                "classes": root / "classes.txt"}, out)) == 0
    assert (out / "splits" / "val.txt").read_text().split() == ["p3", "p4"]


# --- refused file by file -------------------------------------------------------------------


def test_bad_folder_is_refused_file_by_file(tmp_path, capsys):
    """A folder with one bad file of each kind: every run refuses it in one line naming one bad
    file (and line), and marks nothing converted; repaired one at a time, every kind is named
    once, then the folder converts."""
    paths = make_folder(tmp_path / "mine")
    cls, img, msk, val = paths["classes"], paths["images"], paths["masks"], paths["val"]
    good_val = val.read_text()
    cls.write_text("bolt\nnut\nwasher\nnut\n\nspring\n")  # a repeated name (line 4), an empty one (5)
    (img / "stray.jpg").write_bytes(jpeg_bytes(H, W, 99))  # an image without a mask
    val.write_text(good_val + "part_99\n")  # a split list naming a missing image (line 3)
    (msk / "part_01.png").write_bytes(png_bytes(np.zeros((H + 2, W), np.uint8)))  # size differs
    outside = label_grid(3)
    outside[5, 5] = 7  # 5 classes: ids 0..4
    (msk / "part_03.png").write_bytes(png_bytes(outside))
    # kind -> (what its error names first, the repair)
    bad = {
        "repeated name": (f"{cls}:4", lambda: cls.write_text("bolt\nnut\nwasher\ngear\n\nspring\n")),
        "empty name": (f"{cls}:5", lambda: cls.write_text("\n".join(CLASSES) + "\n")),
        "image without a mask": (str(img / "stray.jpg"), lambda: (img / "stray.jpg").unlink()),
        "split list names a missing image": (f"{val}:3", lambda: val.write_text(good_val)),
        "mask size differs from its image": (
            str(msk / "part_01.png"), lambda: (msk / "part_01.png").write_bytes(png_bytes(label_grid(1)))),
        "id outside the class list": (
            str(msk / "part_03.png"), lambda: (msk / "part_03.png").write_bytes(png_bytes(label_grid(3)))),
    }
    out = tmp_path / "out"
    named = []
    while (rc := main(prepare_folder(paths, out))) != 0 and len(named) <= len(bad):
        assert rc == 2
        line = error_line(capsys)
        kinds = [k for k, (where, _) in bad.items() if re.search(rf"error: {re.escape(where)}\b", line)]
        assert len(kinds) == 1 and kinds[0] not in named, line
        named.append(kinds[0])
        assert not (out / "dataset.json").exists()
        bad[kinds[0]][1]()
    assert rc == 0 and sorted(named) == sorted(bad), named
    assert (out / "dataset.json").is_file()


@pytest.mark.parametrize("text, message", [
    ("", "no class names"),
    ("a\n" * 300, "at most 254"),
    ("a\n b \nc\n\n\n", None),  # trailing blank lines and spaces are fine
])
def test_class_file_edge_cases(tmp_path, text, message):
    from cascade_clip.data.own import read_class_names

    path = tmp_path / "classes.txt"
    path.write_text(text if text != "a\n" * 300 else "".join(f"c{i}\n" for i in range(300)))
    if message is None:
        assert read_class_names(path) == ["a", "b", "c"]
    else:
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*{message}"):
            read_class_names(path)


def test_mask_without_image_and_overlapping_lists_are_named(tmp_path, capsys):
    paths = make_folder(tmp_path / "mine")
    (paths["masks"] / "lonely.png").write_bytes(png_bytes(label_grid(0)))
    assert main(prepare_folder(paths, tmp_path / "out")) == 2
    assert f"{paths['masks'] / 'lonely.png'}: mask without an image" in error_line(capsys)
    (paths["masks"] / "lonely.png").unlink()
    paths["val"].write_text("part_00\n")
    assert main(prepare_folder(paths, tmp_path / "out")) == 2
    assert f"{paths['val']}: 'part_00' is in split 'train' too" in error_line(capsys)


def test_unseen_class_missing_from_the_evaluation_split_stops_split(tmp_path, capsys):
    """An unseen class the val split never shows would end a whole run with mIoU(U) n/a:
    `split` refuses it, naming the key, the class and the split."""
    import yaml

    paths = make_folder(tmp_path / "mine")
    for k in (4, 5):  # the val images: no spring (class 4)
        label = label_grid(k)
        label[label == 4] = 0
        (paths["masks"] / f"part_{k:02d}.png").write_bytes(png_bytes(label))
    out = tmp_path / "data"
    assert main(prepare_folder(paths, out)) == 0
    config = tmp_path / "c.yaml"
    for unseen, rc in ((["gear", "spring"], 2), (["gear"], 0)):
        config.write_text(yaml.safe_dump({"experiment": "parts", "dataset": {
            "name": "parts", "root": str(out), "unseen": unseen}}))
        capsys.readouterr()
        assert main(["split", "--config", str(config), "--out", str(tmp_path / "split.json")]) == rc
        if rc:
            assert "dataset.unseen: ['spring'] never occur in split 'val'" in error_line(capsys)
    assert json.loads((tmp_path / "split.json").read_text())["unseen"] == ["gear"]


# --- COCO format ----------------------------------------------------------------------------


def coco_files(root: Path) -> tuple[dict, dict]:
    """Two 24x32 images; instances JSON (a polygon, an RLE, a crowd under an instance) and a
    panoptic JSON with its PNGs; categories with ids 3, 7 and 11."""
    from rehearsal.mirrors import encode_rle

    (root / "images" / "val").mkdir(parents=True)
    for k in (1, 2):
        (root / "images" / "val" / f"{k:06d}.jpg").write_bytes(jpeg_bytes(H, W, k))
    cats = [{"id": 11, "name": "gear"}, {"id": 3, "name": "bolt"}, {"id": 7, "name": "nut"}]
    images = [{"id": k, "file_name": f"{k:06d}.jpg", "height": H, "width": W} for k in (1, 2)]
    box = np.zeros((H, W), bool)
    box[4:12, 4:12] = True
    crowd = np.zeros((H, W), bool)
    crowd[0:16, 0:16] = True
    instances = {"images": images, "categories": cats, "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0,
         "segmentation": [[20, 2, 28, 2, 28, 10, 20, 10]]},  # polygon (x, y), x 20..28, y 2..10
        {"id": 2, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": encode_rle(box)},
        {"id": 3, "image_id": 1, "category_id": 11, "iscrowd": 1, "segmentation": encode_rle(crowd)},
    ]}
    (root / "masks" / "val").mkdir(parents=True)
    annotations = []
    for k in (1, 2):
        ids = np.zeros((H, W, 3), np.uint8)
        ids[:12, :, 0] = 5  # segment 5 (R) = bolt
        ids[12:, :16, 1] = 1  # segment 256 (G) = gear
        Image.fromarray(ids).save(root / "masks" / "val" / f"{k:06d}.png")
        annotations.append({"image_id": k, "file_name": f"{k:06d}.png", "segments_info": [
            {"id": 5, "category_id": 3, "iscrowd": 0}, {"id": 256, "category_id": 11, "iscrowd": 0}]})
    panoptic = {"images": images, "categories": cats, "annotations": annotations}
    return instances, panoptic


def test_coco_instances_and_panoptic(tmp_path):
    instances, panoptic = coco_files(tmp_path)
    (tmp_path / "instances_val.json").write_text(json.dumps(instances))
    (tmp_path / "panoptic_val.json").write_text(json.dumps(panoptic))
    out = tmp_path / "inst"
    assert main(["prepare", "--dataset", "coco", "--images", str(tmp_path / "images"), "--annotations",
                 f"val={tmp_path / 'instances_val.json'}", "--out", str(out)]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classes"] == ["bolt", "nut", "gear"] and meta["name"] == "inst"  # sorted by id
    with Image.open(out / "labels" / "val" / "000001.png") as im:
        lab = np.array(im)
    assert (lab[4:12, 4:12] == 1).all()  # the RLE instance over the crowd
    assert lab[14, 14] == 2 and lab[20, 20] == 255  # crowd elsewhere; nothing: ignore
    assert (lab[3:9, 21:27] == 0).all()  # polygon
    with Image.open(out / "labels" / "val" / "000002.png") as im:
        assert (np.array(im) == 255).all()  # no annotation at all
    out = tmp_path / "pan"
    assert main(["prepare", "--dataset", "coco", "--images", str(tmp_path / "images"), "--masks",
                 str(tmp_path / "masks"), "--annotations", f"val={tmp_path / 'panoptic_val.json'}",
                 "--out", str(out)]) == 0
    with Image.open(out / "labels" / "val" / "000002.png") as im:
        lab = np.array(im)
    assert (lab[:12] == 0).all() and (lab[12:, :16] == 2).all() and (lab[12:, 16:] == 255).all()


@pytest.mark.parametrize("edit, names", [
    (lambda d, _: d["annotations"][1].update(category_id=99),
     "instances_val.json: annotation 2: category_id 99"),
    (lambda d, _: d["categories"].append({"id": 12, "name": "nut"}),
     "instances_val.json: category 12 repeats"),
    (lambda d, _: d["images"].append({"id": 3, "file_name": "000003.jpg", "height": H, "width": W}),
     "000003.jpg: image not found"),
    (lambda d, _: d["images"][0].update(height=H + 1),
     "instances_val.json: annotation 3 is 32x24, image 1 is"),
    (lambda _, root: (root / "images" / "val" / "000002.jpg").write_bytes(jpeg_bytes(H + 1, W, 0)),
     "instances_val.json: label size 32x24 differs from image"),
])
def test_bad_coco_input_is_named(tmp_path, capsys, edit, names):
    instances, _ = coco_files(tmp_path)
    edit(instances, tmp_path)
    (tmp_path / "instances_val.json").write_text(json.dumps(instances))
    assert main(["prepare", "--dataset", "coco", "--images", str(tmp_path / "images"), "--annotations",
                 f"val={tmp_path / 'instances_val.json'}", "--out", str(tmp_path / "out")]) == 2
    assert names in error_line(capsys)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_panoptic_image_without_a_mask_is_named(tmp_path, capsys):
    _, panoptic = coco_files(tmp_path)
    (tmp_path / "masks" / "val" / "000002.png").unlink()
    (tmp_path / "panoptic_val.json").write_text(json.dumps(panoptic))
    assert main(["prepare", "--dataset", "coco", "--images", str(tmp_path / "images"), "--masks",
                 str(tmp_path / "masks"), "--annotations", f"val={tmp_path / 'panoptic_val.json'}",
                 "--out", str(tmp_path / "out")]) == 2
    assert "000002.png: panoptic mask not found" in error_line(capsys)


# --- through the workflow -------------------------------------------------------------------


@pytest.mark.slow
def test_folder_dataset_trains_and_evaluates_through_snakemake(tmp_path):
    """The tiny workflow (test_workflow's config, shrunk further: a random tiny CLIP, prompts
    instead of the feature cache, no self-training) on a folder dataset the config names by
    `dataset.source`: prepare converts it, and the run holds out the config's own unseen
    class and evaluates on it with the config's own templates."""
    import subprocess
    import sys

    import yaml
    from test_workflow import ROOT, _tiny_config

    from cascade_clip.testing import tiny_clip_config

    paths = make_folder(tmp_path / "my data")
    cfg = _tiny_config(tmp_path / "results", tmp_path / "resources")
    cfg["experiment"] = "parts"
    cfg["dataset"] = {"name": "parts", "root": str(tmp_path / "resources" / "data" / "parts"),
                      "unseen": ["gear"], "source": {
                          "format": "folder", "images": str(paths["images"]), "masks": str(paths["masks"]),
                          "classes": str(paths["classes"]),
                          "splits": {"train": str(paths["train"]), "val": str(paths["val"])}}}
    cfg["clip"] = {"model": "tiny", "pretrained": "random", "model_config": tiny_clip_config(),
                   "image_size": 32, "templates": ["a photo of a {}.", "a close-up photo of a {}."]}
    cfg["model"].update(stages=[[2, 3], [4]], encoder_mode="vpt", vpt_tokens=2)
    cfg["train"]["augment"].update(scale=[64, 32], crop_size=32)
    cfg["evaluate"].update(crop_size=32, stride=24, short_side=32, split="val", num_visualize=0)
    for key in ("shapes", "pretrain"):
        cfg.pop(key, None)
    (tmp_path / "work" / "config").mkdir(parents=True)
    (tmp_path / "work" / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    results = tmp_path / "results" / "parts"
    target = str(results / "eval" / "cascade" / "metrics.json")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path / "work"),
           "--cores", "2", target]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(results.rglob("*.log")))
    assert res.returncode == 0, res.stderr[-4000:] + logs
    meta = json.loads((tmp_path / "resources" / "data" / "parts" / "dataset.json").read_text())
    assert meta["name"] == "parts" and meta["classes"] == CLASSES
    split = json.loads((results / "split.json").read_text())
    assert split["unseen"] == ["gear"] and split["seen"] == ["bolt", "nut", "washer", "spring"]
    metrics = json.loads(Path(target).read_text())
    assert metrics["dataset"] == "parts" and metrics["num_images"] == 2 and metrics["split"] == "val"
    assert list(metrics["per_class_iou"]) == CLASSES
    assert metrics["miou_unseen"] is not None and metrics["hiou"] is not None  # gear is in val
    import h5py

    with h5py.File(results / "text" / "parts.h5") as f:
        assert f.attrs["template_set"] == "custom"
        assert json.loads(f.attrs["templates"]) == cfg["clip"]["templates"]


def test_readme_config_for_your_own_data_is_valid(tmp_path):
    """The config the README's "Your own data" section shows passes the one validator, and its
    unseen names are classes of the folder it describes."""
    import yaml
    from test_workflow import ROOT

    from cascade_clip.config import config_from_dict
    from cascade_clip.data.registry import check_unseen_names

    section = (ROOT / "README.md").read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]
    block = section.split("```yaml", 1)[1].split("```", 1)[0]
    cfg = config_from_dict(yaml.safe_load(block), "README")
    assert cfg.dataset.source["format"] == "folder" and isinstance(cfg.clip.templates, list)
    names = ["bolt", "nut", "washer", "gear", "spring"]
    assert check_unseen_names(cfg.dataset.name, cfg.dataset.unseen, names) == ["gear", "spring"]
