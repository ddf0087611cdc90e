"""Evaluation: metrics files, calibration, frozen-CLIP baseline, cross-dataset, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import (
    TINY_CLASSES,
    TINY_UNSEEN,
    make_tiny_dataset,
    one_thread,  # noqa: F401  (autouse: one intra-op thread)
    tiny_config,
    write_config,
)

from cascade_clip.testing import tiny_clip_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, checkpoint) of a 2-step inductive run on the tiny dataset."""
    from cascade_clip.train import train

    tmp = tmp_path_factory.mktemp("eval")
    cfg = tiny_config(make_tiny_dataset(tmp / "data"), tiny_clip_config(), iters=2)
    return cfg, train(cfg, tmp / "run")


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_evaluate_writes_metrics_csv_and_examples(trained, tmp_path):
    from cascade_clip.evaluate import evaluate

    cfg, ckpt = trained
    metrics = evaluate(cfg, tmp_path, checkpoint=ckpt)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("miou_seen", "miou_unseen", "hiou", "per_class_iou", "setting", "split", "checkpoint"):
        assert key in saved
    assert saved["num_images"] == 3 and saved["images_per_s"] > 0
    assert saved["setting"] == "inductive" and saved["split"] == "val"
    assert saved["seen_calibration"] == cfg.model.seen_calibration
    assert list(saved["per_class_iou"]) == TINY_CLASSES
    rows = read_csv(tmp_path / "per_class.csv")
    assert [r["class"] for r in rows] == TINY_CLASSES
    assert {r["class"] for r in rows if r["split"] == "unseen"} == set(TINY_UNSEEN)
    # every labelled pixel of the val split is counted once (32x32 minus 4 ignore pixels each)
    assert sum(int(r["gt_pixels"]) for r in rows) == 3 * (32 * 32 - 4)
    confusion = np.load(tmp_path / "confusion.npy")  # rows ground truth, columns prediction
    assert confusion.shape == (len(TINY_CLASSES),) * 2
    assert confusion.sum(1).tolist() == [int(r["gt_pixels"]) for r in rows]
    assert len(list((tmp_path / "examples").glob("*.png"))) == cfg.evaluate.num_visualize
    assert metrics["miou_seen"] == pytest.approx(saved["miou_seen"])


def test_calibration_only_in_inductive_setting(trained, tmp_path):
    from cascade_clip.evaluate import evaluate

    cfg, ckpt = trained
    cfg.model.seen_calibration = 1.0  # sigmoid scores are in [0, 1]: no seen class can win
    evaluate(cfg, tmp_path / "ind", checkpoint=ckpt)
    rows = read_csv(tmp_path / "ind" / "per_class.csv")
    assert all(int(r["pred_pixels"]) == 0 for r in rows if r["split"] == "seen")
    # the checkpoint's own setting decides, not the config's: a self-trained model evaluated
    # with the base (inductive) config gets no calibration and is labelled transductive
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["setting"] = "transductive"
    torch.save(state, tmp_path / "st.pt")
    metrics = evaluate(cfg, tmp_path / "st", checkpoint=tmp_path / "st.pt")
    assert metrics["seen_calibration"] == 0.0 and metrics["setting"] == "transductive"
    cfg.model.seen_calibration = 0.1


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(classes=["a", "b", "c", "d", "e"]), "trained on classes"),
        (lambda s: s.update(unseen=["sky"]), r"trained with unseen classes \['sky'\]"),
        (lambda s: s.update(clip_weights="sha256:0000"), "trained on another CLIP"),
    ],
    ids=["classes", "unseen", "clip"],
)
def test_checkpoint_for_other_classes_split_or_clip_is_refused(trained, tmp_path, edit, message):
    from cascade_clip.evaluate import evaluate

    cfg, ckpt = trained
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=message):
        evaluate(cfg, tmp_path / "o", checkpoint=tmp_path / "other.pt")
    assert not (tmp_path / "o").exists()


def test_dense_baseline_needs_no_checkpoint(trained, tmp_path):
    from cascade_clip.cli import main

    cfg, _ = trained
    config = write_config(cfg, tmp_path / "c.yaml")
    assert (
        main(["evaluate", "--config", str(config), "--baseline", "dense", "--out", str(tmp_path / "o")]) == 0
    )
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["baseline"] == "dense" and saved["checkpoint"] is None and saved["num_images"] == 3


def test_cross_dataset_treats_every_class_as_seen(trained, tmp_path):
    from cascade_clip.cli import main

    cfg, ckpt = trained
    other = make_tiny_dataset(tmp_path / "other", n_train=1, n_val=2, seed=5)
    config = write_config(cfg, tmp_path / "c.yaml")
    args = ["evaluate", "--config", str(config), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]
    assert main(args + ["--dataset-root", str(other)]) == 0
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["setting"] == "cross-dataset" and saved["num_images"] == 2
    assert saved["miou_unseen"] is None and saved["miou_seen"] is not None


def test_cross_dataset_on_a_16_bit_target_records_both_rules(trained, tmp_path):
    """A target of more than 254 classes (as Context-459, ADE20K-847) has 16-bit labels with
    65535 = ignore: its pixels are all counted, its ignore pixels none, and metrics.json
    names the rule for absent classes and holds the means under both."""
    from PIL import Image

    from cascade_clip.cli import main

    cfg, ckpt = trained
    root = make_tiny_dataset(tmp_path / "wide", n_train=1, n_val=2, seed=7)
    names = TINY_CLASSES + [f"thing {i}" for i in range(300 - len(TINY_CLASSES))]
    for path in (root / "labels" / "val").glob("*.png"):
        with Image.open(path) as im:
            label = np.array(im).astype(np.uint16)
        label[label == 255] = 65535
        label[-1, -3:] = 299  # a class only this wide dataset has
        Image.fromarray(label).save(path)
    (root / "dataset.json").write_text(json.dumps({"name": "wide", "classes": names, "image_suffix": ".png",
                                                   "label_suffix": ".png"}))
    config = write_config(cfg, tmp_path / "c.yaml")
    assert main(["evaluate", "--config", str(config), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"),
                 "--dataset-root", str(root)]) == 0
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["dataset"] == "wide" and len(saved["per_class_iou"]) == 300
    assert saved["absent_class_rule"] == "gt_or_pred"
    rules = saved["by_absent_class_rule"]
    assert set(rules) == {"gt_or_pred", "gt_only"} and rules["gt_or_pred"]["miou"] == saved["miou"]
    confusion = np.load(tmp_path / "o" / "confusion.npy")
    assert confusion.shape == (300, 300) and confusion.sum() == 2 * (32 * 32 - 4)
    assert confusion[299].sum() == 2 * 3
    gt = confusion.sum(1) > 0
    iou = np.array([np.nan if v is None else v for v in saved["per_class_iou"].values()])
    assert rules["gt_only"]["miou"] == pytest.approx(np.nanmean(np.where(gt, iou, np.nan)))


def test_checkpoint_from_other_model_config_is_refused(trained, tmp_path, capsys):
    from cascade_clip.cli import main

    cfg, ckpt = trained
    config = write_config(cfg, tmp_path / "c.yaml")
    base = ["evaluate", "--config", str(config), "--out", str(tmp_path / "o")]
    assert main(base + ["--checkpoint", str(ckpt), "--set", "model.fusion=sum"]) == 2
    err = capsys.readouterr().err
    assert (
        "model_final.pt: checkpoint is from a different model config: model.fusion: checkpoint 'nga'" in err
    )
    assert main(base) == 2
    assert "a checkpoint is needed" in capsys.readouterr().err


# --- VOC-21's background protocols (issue 32) ----------------------------------------------------


def test_voc21_background_protocols_and_catsegs_fold():
    """CAT-Seg's protocol: queries VOC's 20 names then 39 Context names, argmax, every
    prediction >= 20 folded into background. Scoring background as the maximum over those 39
    prompts gives the same labels; FC-CLIP's scores it by its stuff synonyms; one word."""
    from cascade_clip.data.registry import CONTEXT_59, VOC21_BACKGROUND, VOC_21, VOC_CLASSES, class_prompts
    from cascade_clip.inference import class_scores

    catseg = VOC21_BACKGROUND["catseg"]
    assert len(catseg) == 39 and set(catseg) == set(CONTEXT_59) - set(VOC_CLASSES) - {"table"}
    fcclip = VOC21_BACKGROUND["fcclip"]
    assert fcclip[:3] == ("background", "crops", "bush") and len(fcclip) == 72  # 74 published, 2 repeats
    assert VOC21_BACKGROUND["word"] == ("background",)
    prompts = class_prompts("voc21", VOC_21)  # the default: CAT-Seg's
    assert prompts[0] == catseg and prompts[1:] == [(c,) for c in VOC_CLASSES]
    assert class_prompts("voc21", VOC_21, "word")[0] == ("background",)
    assert class_prompts("voc12", VOC_CLASSES) == [(c,) for c in VOC_CLASSES]  # one prompt a class elsewhere
    with pytest.raises(ValueError, match="voc21_background: 'mmseg' is not one of"):
        class_prompts("voc21", VOC_21, "mmseg")

    # our query order: the 39 background prompts, then the 20 VOC classes
    scores = torch.rand(2, 39 + 20, 6, 5)
    groups = [list(range(39))] + [[39 + i] for i in range(20)]
    ours = class_scores(scores, groups).argmax(dim=1)  # 0 = background, 1..20 = VOC's
    catseg_order = torch.cat([scores[:, 39:], scores[:, :39]], dim=1)  # voc20b.json's order
    pred = catseg_order.argmax(dim=1)
    pred[pred >= 20] = 20  # VOCbEvaluator
    assert torch.equal(ours, torch.where(pred == 20, 0, pred + 1))
    one = torch.rand(1, 4, 3, 3)
    assert class_scores(one, [[0], [1], [2], [3]]) is one  # one prompt a class: the scores themselves


def test_voc21_evaluation_names_its_background_protocol(trained, tmp_path):
    """Cross-dataset evaluation on VOC-21: the text embeddings hold the protocol's background
    prompts beside the 20 classes, and metrics.json names the protocol (CAT-Seg's unless set)
    and its prompts."""
    from PIL import Image

    from cascade_clip.cli import main
    from cascade_clip.data.registry import VOC21_BACKGROUND, VOC_21
    from cascade_clip.text_cache import load_text_embeddings

    cfg, ckpt = trained
    root = make_tiny_dataset(tmp_path / "voc21", n_train=1, n_val=2, seed=3)
    for path in (root / "labels" / "val").glob("*.png"):  # tiny ids 0..4 -> background, 1..4
        with Image.open(path) as im:
            label = np.array(im)
        Image.fromarray(np.where(label == 255, 255, label).astype(np.uint8)).save(path)
    (root / "dataset.json").write_text(json.dumps({"name": "voc21", "classes": list(VOC_21),
                                                   "image_suffix": ".png", "label_suffix": ".png"}))
    config = write_config(cfg, tmp_path / "c.yaml")
    for protocol in ("catseg", "word"):
        text, out = tmp_path / f"{protocol}.h5", tmp_path / protocol
        common = ["--config", str(config)]
        if protocol != "catseg":  # the default
            common += ["--set", f"evaluate.voc21_background={protocol}"]
        assert main(["text-embeddings", *common, "--set", "dataset.name=voc21", "--set",
                     f"dataset.root={root}", "--set", "dataset.unseen=[]", "--out", str(text)]) == 0
        assert main(["evaluate", *common, "--checkpoint", str(ckpt), "--text", str(text), "--out", str(out),
                     "--dataset-root", str(root), "--dataset", "voc21"]) == 0
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["voc21_background"] == protocol
        assert saved["background_prompts"] == list(VOC21_BACKGROUND[protocol])
        assert list(saved["per_class_iou"]) == list(VOC_21)
        cfg_here = load_config_from(config, protocol, root)
        names = load_text_embeddings(text, cfg_here)[1]
        assert names == [*VOC21_BACKGROUND[protocol], *VOC_21[1:]]
    # a text file made for another protocol is refused by name
    assert main(["evaluate", "--config", str(config), "--checkpoint", str(ckpt), "--text",
                 str(tmp_path / "word.h5"), "--out", str(tmp_path / "x"), "--dataset-root", str(root),
                 "--dataset", "voc21"]) == 2


def load_config_from(config: Path, protocol: str, root: Path):
    from cascade_clip.config import load_config

    return load_config(config, {"evaluate.voc21_background": protocol, "dataset.name": "voc21",
                                "dataset.root": str(root), "dataset.unseen": []})
