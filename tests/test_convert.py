"""Converters on tiny inputs written in each source's real format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rehearsal.mirrors import context_mat_bytes, jpeg_bytes, png_bytes, sbd_mat_bytes

from cascade_clip.data.convert import (
    convert_ade20k_150,
    convert_ade20k_847,
    convert_coco_stuff,
    convert_coco_stuff_label,
    convert_pascal_context_59,
    convert_pascal_context_459,
    convert_voc12_aug,
    convert_voc21,
    decode_rle,
)
from cascade_clip.data.registry import (
    ADE20K_150,
    ADE20K_847,
    ADE20K_847_IDS,
    COCO_STUFF_171,
    COCO_STUFF_182,
    COCO_STUFF_UNUSED_IDS,
    CONTEXT_59,
    CONTEXT_459,
    VOC_21,
    VOC_CLASSES,
)


def _jpg(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(h, w, seed))


def _png(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    """A label PNG; `palette`: a palette image whose pixels are the class indices, as VOC's
    SegmentationClass files are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(arr, palette=palette))


def _label(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.array(im)


def _check_layout(out: Path, name: str, classes, splits: dict[str, list[str]]) -> None:
    meta = json.loads((out / "dataset.json").read_text())
    assert meta == {"name": name, "classes": list(classes), "image_suffix": ".jpg",
                    "label_suffix": ".png"}
    for split, ids in splits.items():
        assert (out / "splits" / f"{split}.txt").read_text().split() == ids
        presence = json.loads((out / "splits" / f"{split}.classes.json").read_text())
        for i in ids:
            assert (out / "images" / split / f"{i}.jpg").is_file()
            lab = _label(out / "labels" / split / f"{i}.png")
            assert presence[i] == sorted(int(v) for v in np.unique(lab) if v != 255)


# --- COCO-Stuff -------------------------------------------------------------------------------


def test_coco_stuff_171_mapping_matches_names():
    lut_in = np.arange(256, dtype=np.uint8).reshape(16, 16)
    lut_in[lut_in > 181] = 255
    out = convert_coco_stuff_label(lut_in)
    for orig in range(182):
        new = int(out.flat[orig])
        if orig in COCO_STUFF_UNUSED_IDS:
            assert new == 255
        else:
            assert COCO_STUFF_171[new] == COCO_STUFF_182[orig]
    assert len(COCO_STUFF_171) == 171
    assert COCO_STUFF_171[:3] == ("person", "bicycle", "car")
    assert COCO_STUFF_171[-3:] == ("window-blind", "window-other", "wood")
    assert sorted(set(out.ravel()) - {255}) == list(range(171))


def test_convert_coco_stuff(tmp_path):
    src, out = tmp_path / "coco", tmp_path / "out"
    train_map = np.array([[0, 11, 12, 91], [181, 255, 90, 89], [0, 0, 0, 0]], dtype=np.uint8)
    val_map = np.full((3, 5), 147, dtype=np.uint8)  # labels.txt "148: river", 0-based 147
    _png(src / "stuffthingmaps" / "train2017" / "000000000009.png", train_map)
    _png(src / "stuffthingmaps" / "val2017" / "000000000139.png", val_map)
    _jpg(src / "images" / "train2017" / "000000000009.jpg", 3, 4)
    _jpg(src / "images" / "val2017" / "000000000139.jpg", 3, 5)
    assert convert_coco_stuff(src, out) == {"train": 1, "val": 1}
    _check_layout(out, "coco_stuff_164k", COCO_STUFF_171,
                  {"train": ["000000000009"], "val": ["000000000139"]})
    lab = _label(out / "labels" / "train" / "000000000009.png")
    names = {COCO_STUFF_171[v] for v in np.unique(lab) if v != 255}
    assert names == {"person", "stop sign", "banner", "wood", "toothbrush"}
    # unused ids 11 (street sign) and 90 (hair brush), and unlabeled, are ignored
    assert lab[0, 1] == 255 and lab[1, 2] == 255 and lab[1, 1] == 255
    val = _label(out / "labels" / "val" / "000000000139.png")
    assert set(np.unique(val)) == {COCO_STUFF_171.index("river")}
    # A finished conversion is not redone; a bad map value names the file.
    assert convert_coco_stuff(src, out) == {"train": 1, "val": 1}
    _png(src / "stuffthingmaps" / "val2017" / "000000000139.png", np.full((3, 5), 200, np.uint8))
    with pytest.raises(ValueError, match=r"000000000139\.png.*\[200\]"):
        convert_coco_stuff(src, out, force=True)


def test_convert_coco_stuff_size_mismatch_names_files(tmp_path):
    src = tmp_path / "coco"
    _png(src / "stuffthingmaps" / "train2017" / "1.png", np.zeros((3, 4), np.uint8))
    _jpg(src / "images" / "train2017" / "1.jpg", 5, 4)
    with pytest.raises(ValueError, match=r"1\.png: label size 4x3 differs from image .*1\.jpg"):
        convert_coco_stuff(src, tmp_path / "out", splits={"train": "train2017"})


# --- VOC 2012 + SBD ---------------------------------------------------------------------------


def _sbd_mat(path: Path, seg: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sbd_mat_bytes(seg))


def write_voc_fixture(root: Path) -> None:
    """VOC: train [a], val [b]; SBD: train [c, a], val [d, b]."""
    voc = root / "VOCdevkit" / "VOC2012"
    sbd = root / "benchmark_RELEASE" / "dataset"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000002\n")
    sbd.mkdir(parents=True)
    (sbd / "train.txt").write_text("2008_000003\n2007_000001\n")
    (sbd / "val.txt").write_text("2008_000004\n2007_000002\n")
    for i, (h, w) in {"2007_000001": (4, 6), "2007_000002": (5, 3), "2008_000003": (4, 4),
                      "2008_000004": (3, 5)}.items():
        _jpg(voc / "JPEGImages" / f"{i}.jpg", h, w)
    a = np.array([[0, 0, 15, 15, 255, 1]] * 4, dtype=np.uint8)  # bg, person, boundary, aeroplane
    _png(voc / "SegmentationClass" / "2007_000001.png", a, palette=True)
    _png(voc / "SegmentationClass" / "2007_000002.png", np.full((5, 3), 20, np.uint8), palette=True)
    _sbd_mat(sbd / "cls" / "2007_000001.mat", np.full((4, 6), 7, np.uint8))  # VOC PNG wins
    _sbd_mat(sbd / "cls" / "2007_000002.mat", np.full((5, 3), 7, np.uint8))
    _sbd_mat(sbd / "cls" / "2008_000003.mat", np.array([[0, 16], [17, 20]] * 2).repeat(2, 1))
    _sbd_mat(sbd / "cls" / "2008_000004.mat", np.full((3, 5), 12, np.uint8))


def test_convert_voc12_aug(tmp_path):
    write_voc_fixture(tmp_path / "voc12")
    out = tmp_path / "out"
    assert convert_voc12_aug(tmp_path / "voc12", out) == {"train": 3, "val": 1}
    _check_layout(out, "voc12", VOC_CLASSES, {
        "train": ["2007_000001", "2008_000003", "2008_000004"], "val": ["2007_000002"]})
    a = _label(out / "labels" / "train" / "2007_000001.png")
    assert a[0].tolist() == [255, 255, 14, 14, 255, 0]  # from the VOC PNG, not the .mat
    c = _label(out / "labels" / "train" / "2008_000003.png")
    assert c[:2, :].tolist() == [[255, 255, 15, 15], [16, 16, 19, 19]]
    assert VOC_CLASSES[15] == "pottedplant" and VOC_CLASSES[19] == "tvmonitor"
    assert set(np.unique(_label(out / "labels" / "val" / "2007_000002.png"))) == {19}
    assert set(np.unique(_label(out / "labels" / "train" / "2008_000004.png"))) == {11}


def test_voc_missing_label_names_file(tmp_path):
    write_voc_fixture(tmp_path / "voc12")
    (tmp_path / "voc12" / "benchmark_RELEASE" / "dataset" / "cls" / "2008_000004.mat").unlink()
    with pytest.raises(FileNotFoundError, match="2008_000004"):
        convert_voc12_aug(tmp_path / "voc12", tmp_path / "out")


def test_prepare_cli_voc12_then_loader(tmp_path):
    from cascade_clip.cli import main
    from cascade_clip.data.dataset import SegmentationDataset

    write_voc_fixture(tmp_path / "downloads" / "voc12")
    out = tmp_path / "data" / "voc12"
    assert main(["prepare", "--dataset", "voc12", "--downloads", str(tmp_path / "downloads"),
                 "--out", str(out), "--workers", "2"]) == 0
    ds = SegmentationDataset(out, "train", unseen=["pottedplant", "tvmonitor"])
    labels = {ds[i]["id"]: ds[i]["label"] for i in range(len(ds))}
    assert 15 not in labels["2008_000003"] and 19 not in labels["2008_000003"]
    assert main(["prepare", "--dataset", "voc12", "--downloads", str(tmp_path / "nowhere"),
                 "--out", str(out / "x")]) == 2  # one-line error, not a traceback


# --- PASCAL Context (Detail API json) -------------------------------------------------------

# A 40x30 mask and its COCO compressed RLE string as pycocotools 2.0 encodes it
# (mask.encode(np.asfortranarray(m))), to pin the decoder to the reference format.
RLE_REF_COUNTS = (
    "0i37XLK1O11NO10O050K70I10O211OM001032LN32MO0O13000N000OO0010O10O021N81GO0010O0263KKO0011O01"
    "OO52LN01OO010O020O0O2210ONN10O40M003OM12OO0O20N110O70H10O040N0O2OO020M30N0O00010O0011OO073I"
    "N0010O00O031MO034NNON011O13OM01O11N23MM10O0011O22M10O011MO30O0N020N0011OO13OM00002001OOO000"
    "10O00020N048NIN01OO0071IO0001060K0N10O000020N51K00O120NO01010O10OO00010O01020M00020N1050J00"
    "31NO000120M01OO014O012OK232NLO9OI050I035OKN0010O030O0N14OM0O12O33LMO12ON230MN010034N0OK133M"
    "L111O21LO001000O10O00012O11MO021NO030N0O020N1120O0NO40L00010O020O10OO2000N10O22NO0O0030M101"
    "1OOO027NI010"
)
RLE_REF_BITS = (
    "f0153c43995a97beacb148b88ca945edc311aba5e62c0e6248d1bb47352af0b345df84127e8e075656fe286933fd"
    "78dd3397ba801f0a0e43fc663367f13129e3a9b947ae63d43d7f621d55e2fd6653e6d1f4fffd74dc3955d101f95"
    "16997acca697fdd9e273fa674eaf8a55b0bd1009ccf1c6decbdc3456cea1111b3cfb3f6cef039f1faad1646eeab"
    "bb6fbea1a14e0b5922b9675297"
)


def test_decode_rle_matches_pycocotools_reference():
    want = np.unpackbits(np.frombuffer(bytes.fromhex(RLE_REF_BITS), np.uint8))[:1200]
    got = decode_rle({"size": [40, 30], "counts": RLE_REF_COUNTS})
    assert got.shape == (40, 30) and np.array_equal(got, want.reshape(40, 30).astype(bool))
    # uncompressed RLE (list counts), column-major
    m = decode_rle({"size": [2, 3], "counts": [1, 2, 3]})
    assert m.tolist() == [[False, True, False], [True, False, False]]
    with pytest.raises(ValueError, match="cover"):
        decode_rle({"size": [2, 3], "counts": [1, 2]})


def _rle_box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> list[int]:
    flat = np.zeros((h, w), bool)
    flat[y0:y1, x0:x1] = True
    flat = flat.T.ravel()  # column-major
    runs, cur, n = [], False, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return runs


def write_context_fixture(root: Path) -> None:
    jpeg = root / "VOCdevkit" / "VOC2010" / "JPEGImages"
    _jpg(jpeg / "2008_000002.jpg", 6, 8)
    _jpg(jpeg / "2008_000003.jpg", 5, 7)
    data = {
        "info": {}, "parts": [], "annos_occlusion": [],
        "categories": [{"category_id": cid, "name": name, "supercategory": "object"}
                       for name, cid in [("aeroplane", 2), ("bag", 9), ("bird", 25),
                                         ("wall", 440), ("wood", 458), ("accordion", 1),
                                         ("air conditioner", 3)]]
        + [{"category_id": cid, "name": f"c{cid}"} for cid in
           (18, 19, 22, 23, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113,
            115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308,
            324, 326, 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 445,
            454)],
        "images": [
            {"image_id": 2008000002, "file_name": "2008_000002.jpg", "height": 6, "width": 8,
             "phase": "train"},
            {"image_id": 2008000003, "file_name": "2008_000003.jpg", "height": 5, "width": 7,
             "phase": "val"},
        ],
        "annos_segmentation": [
            # compressed RLE strings from pycocotools for 6x8 boxes
            {"id": 1, "image_id": 2008000002, "category_id": 2, "iscrowd": 0, "parts": [],
             "segmentation": {"size": [6, 8], "counts": "03300000h0"}},  # rows 0-2, cols 0-3
            {"id": 2, "image_id": 2008000002, "category_id": 3, "iscrowd": 0, "parts": [],
             "segmentation": {"size": [6, 8], "counts": "33300000e0"}},  # rows 3-5, cols 0-3
            {"id": 3, "image_id": 2008000002, "category_id": 440, "iscrowd": 0, "parts": [],
             "segmentation": {"size": [6, 8], "counts": "h051000000"}},  # rows 0-4, cols 4-7
            {"id": 4, "image_id": 2008000002, "category_id": 25, "iscrowd": 0, "parts": [],
             "segmentation": {"size": [6, 8], "counts": "o02405"}},  # rows 1-2, cols 5-6
            {"id": 5, "image_id": 2008000003, "category_id": 458, "iscrowd": 0, "parts": [],
             "segmentation": {"size": [5, 7], "counts": "023000000000000"}},  # rows 0-1
            {"id": 6, "image_id": 2008000003, "category_id": 9, "iscrowd": 0, "parts": [],
             "segmentation": {"size": [5, 7], "counts": _rle_box(5, 7, 2, 5, 0, 3)}},
        ],
    }
    (root / "trainval_merged.json").write_text(json.dumps(data))


def test_convert_pascal_context_59(tmp_path):
    write_context_fixture(tmp_path / "ctx")
    out = tmp_path / "out"
    assert convert_pascal_context_59(tmp_path / "ctx", out) == {"train": 1, "val": 1}
    _check_layout(out, "pascal_context_59", CONTEXT_59,
                  {"train": ["2008_000002"], "val": ["2008_000003"]})
    idx = {name: i for i, name in enumerate(CONTEXT_59)}
    aer, wall, bird, wood, bag = idx["aeroplane"], idx["wall"], idx["bird"], idx["wood"], idx["bag"]
    lab = _label(out / "labels" / "train" / "2008_000002.png")
    want = np.full((6, 8), 255, np.uint8)
    want[0:3, 0:4] = aer
    want[3:6, 0:4] = 255  # category 3 is not one of the 59
    want[0:5, 4:8] = wall
    want[1:3, 5:7] = bird  # later annotation wins
    assert np.array_equal(lab, want)
    val = _label(out / "labels" / "val" / "2008_000003.png")
    want = np.full((5, 7), 255, np.uint8)
    want[0:2] = wood
    want[2:5, 0:3] = bag
    assert np.array_equal(val, want)
    assert (aer, bag, wall, wood) == (0, 1, 55, 58)


def test_context_bad_rle_names_json_and_image(tmp_path):
    write_context_fixture(tmp_path / "ctx")
    path = tmp_path / "ctx" / "trainval_merged.json"
    data = json.loads(path.read_text())
    data["annos_segmentation"][0]["segmentation"]["counts"] = "03"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"trainval_merged\.json: annotation 1 of image 2008000002"):
        convert_pascal_context_59(tmp_path / "ctx", tmp_path / "out")


# --- the open-vocabulary suite's targets --------------------------------------------------------


def _label16(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "I;16"
        return np.array(im)


def test_convert_voc21_keeps_background_as_class_0(tmp_path):
    write_voc_fixture(tmp_path / "voc12")
    out = tmp_path / "out"
    assert convert_voc21(tmp_path / "voc12", out) == {"train": 3, "val": 1}
    _check_layout(out, "voc21", VOC_21, {
        "train": ["2007_000001", "2008_000003", "2008_000004"], "val": ["2007_000002"]})
    a = _label(out / "labels" / "train" / "2007_000001.png")
    assert a[0].tolist() == [0, 0, 15, 15, 255, 1]  # background, person, boundary, aeroplane
    assert VOC_21[15] == "person" and VOC_21[0] == "background"


def write_context459_release(root: Path, labelmaps: dict[str, np.ndarray], names=CONTEXT_459) -> None:
    """PASCAL-Context's trainval.tar.gz, extracted: trainval/<id>.mat and labels.txt."""
    (root / "trainval").mkdir(parents=True, exist_ok=True)
    for image_id, labelmap in labelmaps.items():
        (root / "trainval" / f"{image_id}.mat").write_bytes(context_mat_bytes(labelmap))
    (root / "labels.txt").write_text("".join(f"{i + 1}: {n}\n" for i, n in enumerate(names)))


def test_convert_pascal_context_459_from_the_release_label_maps(tmp_path):
    """LabelMap c -> train id c - 1 (the 59's and the other 400 alike), 0 -> 65535, pixel for
    pixel, in 16-bit labels; the val images of Context-59's Detail json only; labels.txt's
    names checked against ours (spelling aside), a bad file named."""
    write_context_fixture(tmp_path / "pascal_context_59")
    rng = np.random.default_rng(0)
    val = rng.integers(0, 460, (5, 7)).astype(np.uint16)
    val[0, :3] = (0, 459, 3)  # unlabeled, wool, air conditioner
    release = tmp_path / "pascal_context_459"
    joined = [n.replace(" ", "") for n in CONTEXT_459]  # CAT-Seg's spelling of the same names
    write_context459_release(release, {"2008_000002": np.ones((6, 8), np.uint16), "2008_000003": val}, joined)
    out = tmp_path / "out"
    assert convert_pascal_context_459(release, out) == {"val": 1}
    assert json.loads((out / "dataset.json").read_text())["classes"] == list(CONTEXT_459)
    assert not (out / "splits" / "train.txt").exists()
    label = _label16(out / "labels" / "val" / "2008_000003.png")
    assert np.array_equal(label, np.where(val == 0, 65535, val.astype(np.int64) - 1))
    assert label[0, :3].tolist() == [65535, 458, 2] and CONTEXT_459[2] == "air conditioner"
    presence = json.loads((out / "splits" / "val.classes.json").read_text())
    assert presence["2008_000003"] == sorted(int(v) - 1 for v in np.unique(val) if v)
    assert (out / "images" / "val" / "2008_000003.jpg").stat().st_nlink == 2  # Context-59's JPEG, linked

    bad = val.copy()
    bad[1, 1] = 460
    write_context459_release(release, {"2008_000003": bad})
    with pytest.raises(ValueError, match=r"trainval/2008_000003\.mat: LabelMap values \[460\]"):
        convert_pascal_context_459(release, tmp_path / "o2")
    (release / "trainval" / "2008_000003.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"trainval/2008_000003\.mat: PASCAL-Context label map"):
        convert_pascal_context_459(release, tmp_path / "o3")
    names = list(CONTEXT_459)
    names[10] = "balloons"
    write_context459_release(release, {"2008_000003": val}, names)
    with pytest.raises(ValueError, match=r"labels\.txt:11: class 11 is 'balloons', the registry's 'balloon'"):
        convert_pascal_context_459(release, tmp_path / "o4")


def _ade150_fixture(root: Path, value: int = 150) -> None:
    base = root / "ADEChallengeData2016"
    for folder, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        _jpg(base / "images" / folder / f"{stem}.jpg", 2, 3)
        _png(base / "annotations" / folder / f"{stem}.png", np.array([[0, 1, 2], [149, value, 0]], np.uint8))


def test_convert_ade20k_150_reduces_zero_label(tmp_path):
    _ade150_fixture(tmp_path / "ade")
    out = tmp_path / "out"
    assert convert_ade20k_150(tmp_path / "ade", out) == {"train": 1, "val": 1}
    _check_layout(out, "ade20k_150", ADE20K_150,
                  {"train": ["ADE_train_00000001"], "val": ["ADE_val_00000001"]})
    lab = _label(out / "labels" / "val" / "ADE_val_00000001.png")
    assert lab.tolist() == [[255, 0, 1], [148, 149, 255]]
    _ade150_fixture(tmp_path / "bad", value=151)
    with pytest.raises(ValueError, match=r"ADE_train_00000001\.png: values \[151\]"):
        convert_ade20k_150(tmp_path / "bad", tmp_path / "out2")


def _ade_seg(index: np.ndarray) -> np.ndarray:
    rgb = np.zeros((*index.shape, 3), np.uint8)
    rgb[..., 0] = index // 256 * 10 + 7  # R / 10 drops the 7
    rgb[..., 1] = index % 256
    rgb[..., 2] = 3
    return rgb


def opencv_nearest_rows(src: int, dst: int) -> np.ndarray:
    """The source row (or column) of each output one under OpenCV's INTER_NEAREST: floor(x *
    (1 / (dst / src))), clamped; stated here independently of OpenCV, as a test oracle."""
    return np.minimum(np.floor(np.arange(dst) * (1.0 / (dst / src))).astype(np.int64), src - 1)


def test_ade20k_847_labels_follow_maskformers_opencv_nearest_rule():
    """A 1536x2048 label map shrunk to 512x683 as MaskFormer's converter does: every pixel the
    source pixel OpenCV's nearest rule picks (PIL's centre rule, used before, differs)."""
    from cascade_clip.data.convert import ade20k_847_resize

    rng = np.random.default_rng(0)
    for h, w in ((1536, 2048), (600, 700), (2000, 513), (683, 1024)):
        label = rng.integers(0, 847, (h, w)).astype(np.uint16)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        small_image, small = ade20k_847_resize(image, label)
        nh, nw = small.shape
        assert min(nh, nw) == 512 and small_image.shape == (nh, nw, 3)
        want = label[opencv_nearest_rows(h, nh)][:, opencv_nearest_rows(w, nw)]
        assert np.array_equal(small, want), (h, w)
        pil = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
        assert (pil != want).mean() > 0.005, (h, w)  # the rule matters
    image, label = rng.integers(0, 256, (512, 700, 3), dtype=np.uint8), np.zeros((512, 700), np.uint16)
    assert ade20k_847_resize(image, label)[1] is label  # a short side of 512: kept


def test_convert_ade20k_847_maps_object_indices_and_shrinks_large_images(tmp_path):
    """R / 10 * 256 + G through MaskFormer's 847-class map (others 65535); an image whose
    short side is above 512 shrinks to 512 (its label nearest), every image is re-saved."""
    val = tmp_path / "ade" / "ADE20K_2021_17_01" / "images" / "ADE" / "validation"
    wall, person = ADE20K_847_IDS[0][0], dict((n, i) for i, n in ADE20K_847_IDS)[ADE20K_847[11]]
    small = np.array([[wall, person, 0], [3157, wall, wall]])
    _jpg(val / "cultural" / "ADE_val_00000002.jpg", 2, 3)
    Image.fromarray(_ade_seg(small)).save(val / "cultural" / "ADE_val_00000002_seg.png")
    big = np.full((600, 700), wall)
    big[:300] = person
    _jpg(val / "urban" / "street" / "ADE_val_00000001.jpg", 600, 700)
    Image.fromarray(_ade_seg(big)).save(val / "urban" / "street" / "ADE_val_00000001_seg.png")
    train = tmp_path / "ade" / "ADE20K_2021_17_01" / "images" / "ADE" / "training"
    _jpg(train / "x" / "ADE_train_00000001.jpg", 2, 3)
    out = tmp_path / "out"
    assert convert_ade20k_847(tmp_path / "ade", out) == {"val": 2}
    assert (out / "splits" / "val.txt").read_text().split() == ["ADE_val_00000001", "ADE_val_00000002"]
    small_label = _label16(out / "labels" / "val" / "ADE_val_00000002.png")
    assert small_label.tolist() == [[0, 11, 65535], [65535, 0, 0]]
    lab = _label16(out / "labels" / "val" / "ADE_val_00000001.png")
    assert lab.shape == (512, 597)  # round(700 / 600 * 512)
    assert (lab[:250] == 11).all() and (lab[260:] == 0).all()
    with Image.open(out / "images" / "val" / "ADE_val_00000001.jpg") as im:
        assert im.size == (597, 512)
    small_image = out / "images" / "val" / "ADE_val_00000002.jpg"
    assert small_image.stat().st_nlink == 1 and small_image.read_bytes() != (val / "cultural" /
                                                                            "ADE_val_00000002.jpg").read_bytes()
