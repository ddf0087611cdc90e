"""Prediction on the user's own images with any class names; bad images are reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_train import (
    make_tiny_dataset,
    one_thread,  # noqa: F401  (autouse: one intra-op thread)
    tiny_config,
    write_config,
)


def test_predict_cli_writes_labels_and_overlays_and_reports_bad_images(tmp_path, tiny_clip_config, capsys):
    from cascade_clip.cli import main
    from cascade_clip.train import train

    cfg = tiny_config(make_tiny_dataset(tmp_path / "data", n_train=2, n_val=1), tiny_clip_config, iters=1)
    ckpt = train(cfg, tmp_path / "run")
    config = write_config(cfg, tmp_path / "c.yaml")
    good = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    missing = tmp_path / "missing.png"
    out = tmp_path / "pred"
    args = ["predict", "--config", str(config), "--checkpoint", str(ckpt), "--out", str(out)]
    code = main(args + ["--classes", "cat, grass,sky", str(missing), str(good), str(broken)])
    err = capsys.readouterr().err
    assert code == 1
    assert "missing.png: image not found" in err and "broken.png: unreadable image" in err
    label = np.asarray(Image.open(out / "photo_label.png"))
    assert label.shape == (30, 50) and label.max() <= 2
    assert Image.open(out / "photo_overlay.png").size[0] > 0
    assert json.loads((out / "classes.json").read_text()) == ["cat", "grass", "sky"]
    assert main(args + ["--classes", "cat,grass", str(good)]) == 0


def test_parse_classes():
    from cascade_clip.predict import parse_classes

    assert parse_classes(" cat,grass , sky,") == ["cat", "grass", "sky"]
    with pytest.raises(ValueError, match="repeated"):
        parse_classes("cat,cat")
    with pytest.raises(ValueError, match="no class names"):
        parse_classes(" , ")
