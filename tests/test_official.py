"""Fidelity to the authors' release: `import-official` on a release-format checkpoint built
here at tiny size, checked against an independent forward pass written from the release's
layout (separate q/k/v attention, norm2/norm3, prompt_norm, doubled CLS, ...), and the
official-compat options (templates, CLS, positional resize, Context's released split,
parameter counts at paper size)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import (
    TINY_UNSEEN,
    make_tiny_dataset,
    one_thread,  # noqa: F401  (autouse: one intra-op thread)
    tiny_config,
    write_config,
)

from cascade_clip.config import ClipConfig, DecoderConfig, ModelConfig
from cascade_clip.testing import tiny_clip_config

T = 3  # prompt tokens
STAGES = [[1, 2], [3, 4], [5]]  # two NGA stages and the last block, as the release's 3+3+1
LAYERS, HEADS = 2, 2


def release_config(root):
    clip_cfg = tiny_clip_config()
    clip_cfg["vision_cfg"]["layers"] = 5
    cfg = tiny_config(root, clip_cfg)
    cfg.model = ModelConfig(
        stages=STAGES,
        encoder_mode="vpt",
        vpt_tokens=T,
        decoder=DecoderConfig(layers=LAYERS, heads=HEADS, ffn_dim=4 * 32, dropout=0.0),
    )
    return cfg


def release_state(clip_visual: torch.nn.Module, num_seen: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A state_dict in the release's key layout, random where the release trains or draws."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    width, embed = clip_visual.conv1.out_channels, clip_visual.proj.shape[1]
    depth = len(clip_visual.transformer.resblocks)
    n_taps = sum(len(s) for s in STAGES) - 1
    s: dict[str, torch.Tensor] = {f"backbone.{k}": v.clone() for k, v in clip_visual.state_dict().items()}
    s["backbone.prompt_embeddings"] = rnd(1, T, width)
    s["backbone.deep_prompt_embeddings"] = rnd(depth - 1, T, width)
    s["backbone.prompt_proj.weight"], s["backbone.prompt_proj.bias"] = rnd(width, width), rnd(width)
    s["backbone.prompt_norm.weight"], s["backbone.prompt_norm.bias"] = 1 + rnd(width), rnd(width)
    for i in range(n_taps):
        s[f"backbone.ln_layers.{i}.weight"], s[f"backbone.ln_layers.{i}.bias"] = 1 + rnd(width), rnd(width)
    s["backbone.proj_layers"] = rnd(n_taps, width, embed, scale=width**-0.5)
    s["decode_head.weights_s1"] = torch.tensor([0.6, 1.1])
    s["decode_head.weights_s2"] = torch.tensor([0.3, 0.9])
    d, ffn = embed, 4 * embed
    for st in range(3):
        s[f"decode_head.q_projs.{st}.weight"], s[f"decode_head.q_projs.{st}.bias"] = rnd(d, 2 * embed), rnd(d)
        for lay in range(LAYERS):
            p = f"decode_head.cascade_decoders.{st}.layers.{lay}."
            for n in ("q", "k", "v", "proj"):
                s[p + f"multihead_attn.{n}.weight"], s[p + f"multihead_attn.{n}.bias"] = rnd(d, d), rnd(d)
            s[p + "self_attn.in_proj_weight"], s[p + "self_attn.in_proj_bias"] = rnd(3 * d, d), rnd(3 * d)
            s[p + "self_attn.out_proj.weight"], s[p + "self_attn.out_proj.bias"] = rnd(d, d), rnd(d)
            s[p + "linear1.weight"], s[p + "linear1.bias"] = rnd(ffn, d), rnd(ffn)
            s[p + "linear2.weight"], s[p + "linear2.bias"] = rnd(d, ffn), rnd(d)
            for n in ("norm1", "norm2", "norm3"):
                s[p + f"{n}.weight"], s[p + f"{n}.bias"] = 1 + rnd(d), rnd(d)
    s["decode_head.loss_decode.criterion.empty_weight"] = torch.ones(num_seen + 1)
    s["text_encoder.positional_embedding"] = rnd(16, 32)
    return s


def release_forward(s: dict, clip_visual, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The release's forward, written from its layout: (B, 3, H, W), (K, C) -> (B, K, h, w)."""
    b = images.shape[0]
    x = F.conv2d(images, s["backbone.conv1.weight"], stride=clip_visual.conv1.stride)
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls_emb = s["backbone.class_embedding"]
    pos = s["backbone.positional_embedding"]
    x = torch.cat([cls_emb.expand(b, 1, -1), x], dim=1)
    x = x + torch.cat([(pos[0] + cls_emb)[None], pos[1:]])[None]  # the CLS embedding twice
    x = F.layer_norm(x, x.shape[-1:], s["backbone.ln_pre.weight"], s["backbone.ln_pre.bias"])

    def prompts(tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, s["backbone.prompt_proj.weight"], s["backbone.prompt_proj.bias"]).expand(
            b, -1, -1
        )

    def prompt_norm(t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            t, t.shape[-1:], s["backbone.prompt_norm.weight"], s["backbone.prompt_norm.bias"], 1e-6
        )

    out_indices = [blk - 1 for stage in STAGES for blk in stage][:-1]
    hidden = torch.cat([x[:, :1], prompts(s["backbone.prompt_embeddings"][0]), x[:, 1:]], dim=1)
    features = []
    for i, block in enumerate(clip_visual.transformer.resblocks):
        if i > 0:
            deep = prompts(s["backbone.deep_prompt_embeddings"][i - 1])
            hidden = torch.cat([hidden[:, :1], deep, hidden[:, 1 + T :]], dim=1)
        hidden = block(hidden)  # the frozen CLIP block itself (batch first)
        if i in out_indices:
            features.append(prompt_norm(hidden))
    encoded = prompt_norm(hidden)
    x = F.layer_norm(encoded, encoded.shape[-1:], s["backbone.ln_post.weight"], s["backbone.ln_post.bias"])
    x = x @ s["backbone.proj"]
    global_token = F.normalize(x[:, 0], dim=-1)
    laterals = []
    for idx, f in enumerate(features):
        f = F.layer_norm(
            f, f.shape[-1:], s[f"backbone.ln_layers.{idx}.weight"], s[f"backbone.ln_layers.{idx}.bias"]
        )
        laterals.append(F.normalize((f @ s["backbone.proj_layers"][idx])[:, -h * w :], dim=-1))
    laterals.append(F.normalize(x[:, -h * w :], dim=-1))

    t = text.expand(b, -1, -1)
    r = torch.cat([t * global_token[:, None], t], dim=-1)
    stage_inputs = [
        sum(wt * lat for wt, lat in zip(s["decode_head.weights_s1"], laterals[0:2])),
        sum(wt * lat for wt, lat in zip(s["decode_head.weights_s2"], laterals[2:4])),
        laterals[4],
    ]
    total = 0
    for st, memory in enumerate(stage_inputs):
        q_in = F.linear(r, s[f"decode_head.q_projs.{st}.weight"], s[f"decode_head.q_projs.{st}.bias"])
        for lay in range(LAYERS):
            p = f"decode_head.cascade_decoders.{st}.layers.{lay}."

            def lin(name: str, inp: torch.Tensor, p: str = p) -> torch.Tensor:
                return F.linear(inp, s[p + name + ".weight"], s[p + name + ".bias"])

            def split_heads(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(b, t.shape[1], HEADS, -1).transpose(1, 2)

            q = split_heads(lin("multihead_attn.q", q_in))
            k = split_heads(lin("multihead_attn.k", memory))
            v = split_heads(lin("multihead_attn.v", memory))
            attn = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)  # (B, H, K, N)
            saved = attn.sum(1) / HEADS
            out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, q_in.shape[-1])
            tgt = q_in + lin("multihead_attn.proj", out)
            tgt = F.layer_norm(tgt, tgt.shape[-1:], s[p + "norm2.weight"], s[p + "norm2.bias"])
            ffn = lin("linear2", F.relu(lin("linear1", tgt)))
            q_in = F.layer_norm(tgt + ffn, tgt.shape[-1:], s[p + "norm3.weight"], s[p + "norm3.bias"])
        total = total + saved
    return total.reshape(b, -1, h, w)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(config, config file, release checkpoint path, its state_dict, the CLIP)."""
    from cascade_clip.model import load_clip

    tmp = tmp_path_factory.mktemp("official")
    cfg = release_config(make_tiny_dataset(tmp / "data"))
    clip, _ = load_clip(cfg.clip)
    state = release_state(clip.visual, num_seen=5 - len(TINY_UNSEEN))
    path = tmp / "release.pth"
    torch.save({"meta": {"iter": 80000, "CLASSES": ["a", "b"]}, "state_dict": state}, path)
    return cfg, write_config(cfg, tmp / "config.yaml"), path, state, clip


def test_converted_checkpoint_predicts_what_the_release_weights_predict(release, tmp_path):
    from cascade_clip.cli import main
    from cascade_clip.data import SegmentationDataset
    from cascade_clip.data.transforms import eval_transform
    from cascade_clip.evaluate import evaluate, load_model
    from cascade_clip.inference import calibrate, predict_labels, sliding_window_scores
    from cascade_clip.metrics import confusion_matrix
    from cascade_clip.model import config_class_embeddings

    cfg, cfg_path, path, state, clip = release
    out = tmp_path / "imported.pt"
    assert (
        main(["import-official", "--config", str(cfg_path), "--checkpoint", str(path), "--out", str(out)])
        == 0
    )
    model, clip_e, tokenizer, ckpt = load_model(cfg, out, None, torch.device("cpu"))
    assert ckpt["step"] == 80000 and ckpt["setting"] == "inductive" and ckpt["unseen"] == TINY_UNSEEN

    names = tuple(ckpt["classes"])
    text = config_class_embeddings(cfg, clip_e, tokenizer, names, "cpu")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(images, text)
        theirs = release_forward(state, clip.visual, images, text)
    assert ours.shape == theirs.shape == (2, len(names), 4, 4)
    assert theirs.abs().max() > 0.1  # a real signal, not zeros on both sides
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)

    # evaluate on the converted file = the same sliding-window inference on the release weights
    evaluate(cfg, tmp_path / "eval", checkpoint=out, device="cpu")
    confusion = np.zeros((len(names),) * 2, dtype=np.int64)
    seen_ids = [i for i, n in enumerate(names) if n not in TINY_UNSEEN]
    dataset = SegmentationDataset(
        cfg.dataset.root, "val", mode="eval", transform=eval_transform(cfg.evaluate.short_side)
    )
    with torch.no_grad():
        for item in dataset:
            scores = sliding_window_scores(
                lambda win: release_forward(state, clip.visual, win, text),
                item["image"][None],
                len(names),
                cfg.evaluate.crop_size,
                cfg.evaluate.stride,
            )
            scores = calibrate(scores, seen_ids, cfg.model.seen_calibration)
            confusion += confusion_matrix(
                predict_labels(scores, tuple(item["label"].shape))[0], item["label"], len(names)
            )
    assert np.array_equal(np.load(tmp_path / "eval" / "confusion.npy"), confusion)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("decode_head.q_projs.1.weight"), r"missing \['decode_head.q_projs.1.weight'\]"),
        (
            lambda s: s.update({"decode_head.extra.weight": torch.ones(1)}),
            r"unexpected \['decode_head.extra.weight'\]",
        ),
        (lambda s: s.update({"backbone.prompt_embeddings": torch.zeros(1, T + 1, 48)}), "wrong shape"),
        (lambda s: s.update({"backbone.proj_layers": torch.zeros(2, 48, 32)}), "proj_layers holds 2 taps"),
        (
            lambda s: s["backbone.transformer.resblocks.2.mlp.c_fc.weight"].add_(0.01),
            r"backbone.transformer.resblocks.2.mlp.c_fc.weight differs from the CLIP",
        ),
        (
            lambda s: s.update({"decode_head.loss_decode.criterion.empty_weight": torch.ones(8)}),
            "trained for 7 classes",
        ),
    ],
    ids=["missing", "unexpected", "shape", "taps", "clip", "classes"],
)
def test_bad_release_checkpoint_is_one_clear_error_and_writes_nothing(
    release, tmp_path, capsys, edit, message
):
    from cascade_clip.cli import main

    _, cfg_path, _, state, _ = release
    bad = {k: v.clone() for k, v in state.items()}
    edit(bad)
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": bad}, path)
    out = tmp_path / "out.pt"
    assert (
        main(["import-official", "--config", str(cfg_path), "--checkpoint", str(path), "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.pth" in err
    assert __import__("re").search(message, err), err
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_config_with_the_input_adapter_is_refused(release, tmp_path, capsys):
    from cascade_clip.cli import main

    _, cfg_path, path, _, _ = release
    out = tmp_path / "o.pt"
    args = ["import-official", "--config", str(cfg_path), "--checkpoint", str(path), "--out", str(out)]
    assert main([*args, "--set", "model.decoder.input_adapter=true"]) == 2
    assert "input_adapter" in capsys.readouterr().err and not out.exists()


# --- official-compat options ----------------------------------------------------------------


def test_paper_size_parameter_counts_match_the_release():
    """ViT-B/16 head: 22,064,646 live parameters (three 3-layer decoders, q_projs, NGA);
    COCO's 50 prompts with prompt_proj and prompt_norm: 1,052,928."""
    from cascade_clip.model.encoder import TappedEncoder
    from cascade_clip.model.head import CascadeHead

    head = CascadeHead(ModelConfig(), embed_dim=512)
    assert sum(p.numel() for p in head.parameters()) == 22_064_646
    adapter = CascadeHead(ModelConfig(decoder=DecoderConfig(input_adapter=True)), embed_dim=512)
    assert sum(p.numel() for p in adapter.parameters()) - 22_064_646 == 3 * (512 * 512 + 512 + 2 * 512)

    visual = torch.nn.Module()  # only the shapes TappedEncoder reads
    visual.conv1 = torch.nn.Conv2d(3, 768, 16, 16, bias=False)
    visual.proj = torch.nn.Parameter(torch.zeros(768, 512))
    visual.transformer = torch.nn.Module()
    visual.transformer.resblocks = torch.nn.ModuleList([torch.nn.Identity() for _ in range(12)])
    enc = TappedEncoder(visual, blocks=[6, 7, 8, 9, 10, 11, 12], mode="vpt", vpt_tokens=50, prompt_norm=True)
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) == 1_052_928


def test_official_templates_and_raw_names():
    from cascade_clip.config import Config, DatasetConfig
    from cascade_clip.model.text import config_templates, prompt_name

    def templates(dataset: str, **clip: str) -> tuple[str, tuple[str, ...]]:
        return config_templates(Config(clip=ClipConfig(**clip), dataset=DatasetConfig(name=dataset)))

    name, coco = templates("coco_stuff_164k")
    assert name == "official-multi" and len(coco) == 15 and len(set(coco)) == 15
    assert coco[0] == "a photo of a {}." and coco[-1] == "This is one {} in the scene."
    assert templates("pascal_context_59")[1] == coco
    assert templates("voc12") == ("official-single", ("a photo of a {}",))  # no period
    assert templates("voc12", templates="legacy-single")[1] == ("a photo of a {}.",)
    assert prompt_name("wall-concrete") == "wall-concrete"
    assert prompt_name("wall-concrete", "readable") == "wall concrete"
    with pytest.raises(ValueError, match="unknown template set 'coco'"):
        templates("voc12", templates="coco")


def test_cls_token_official_doubles_the_class_embedding(tiny_clip_config):
    from cascade_clip.model import load_clip
    from cascade_clip.model.encoder import TappedEncoder

    clip, _ = load_clip(
        ClipConfig(model="t", pretrained="random", model_config=tiny_clip_config, image_size=32)
    )
    images = torch.randn(1, 3, 32, 32)
    official = TappedEncoder(clip.visual, [4], cls_token="official")
    standard = TappedEncoder(clip.visual, [4], cls_token="standard")
    x_off, _ = official._embed(images)
    x_std, _ = standard._embed(images)
    v = clip.visual
    expected = v.ln_pre((2 * v.class_embedding + v.positional_embedding[0])[None, None])[0, 0]
    torch.testing.assert_close(x_off[0, 0], expected)
    torch.testing.assert_close(x_off[:, 1:], x_std[:, 1:])  # patch tokens are untouched
    assert not torch.allclose(x_off[0, 0], x_std[0, 0])


def test_pos_resize_bilinear_is_the_default_and_bicubic_an_option(tiny_clip_config):
    from cascade_clip.model import load_clip

    def pos(**kw) -> torch.Tensor:
        cfg = ClipConfig(model="t", pretrained="random", model_config=tiny_clip_config, image_size=64, **kw)
        return load_clip(cfg)[0].visual.positional_embedding.detach()

    src_cfg = ClipConfig(model="t", pretrained="random", model_config=tiny_clip_config, image_size=32)
    src = load_clip(src_cfg)[0]
    grid = src.visual.positional_embedding.detach()[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    bilinear = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    bilinear = bilinear.permute(0, 2, 3, 1).reshape(64, -1)
    torch.testing.assert_close(pos()[1:], bilinear)
    assert not torch.allclose(pos(pos_resize="bicubic")[1:], bilinear)


def test_context_released_split_by_name():
    """The release's Context config holds out ids [0, 2, 3, 7, 9, 13, 17, 19, 31, 37] of the
    alphabetical 59-class list; `official-release` names those classes."""
    from cascade_clip.data.registry import CONTEXT_59, unseen_class_names

    released = [CONTEXT_59[i] for i in (0, 2, 3, 7, 9, 13, 17, 19, 31, 37)]
    assert unseen_class_names("pascal_context_59", "official-release") == released
    paper = unseen_class_names("pascal_context_59", None)
    assert unseen_class_names("pascal_context_59", "paper") == paper != released
    with pytest.raises(ValueError, match="no split named 'bogus'"):
        unseen_class_names("pascal_context_59", "bogus")


def test_real_configs_build_the_release_model():
    from pathlib import Path

    from cascade_clip.config import load_config

    root = Path(__file__).resolve().parents[1] / "config"
    for name, tokens in (("coco_stuff", 50), ("voc", 10), ("context", 35)):
        cfg = load_config(root / f"{name}.yaml")
        m = cfg.model
        assert (m.encoder_mode, m.vpt_tokens, m.vpt_prompt_norm, m.cls_token) == (
            "vpt",
            tokens,
            True,
            "official",
        )
        assert m.stages == [[6, 7, 8], [9, 10, 11], [12]] and m.tap_projection == "random"
        assert m.decoder == DecoderConfig(layers=3, heads=8, ffn_dim=2048, dropout=0.1, input_adapter=False)
        assert (cfg.clip.pos_resize, cfg.clip.templates, cfg.clip.prompt_names) == (
            "bilinear",
            "dataset",
            "raw",
        )
        assert not cfg.train.amp and cfg.train.batch_size == 4 and math.isclose(cfg.train.lr, 2e-4)
    assert load_config(root / "voc.yaml").self_train.batch_size == 8


def test_imported_checkpoint_records_its_clip_and_evaluate_checks_it(release, tmp_path):
    """import-official writes the CLIP's weights digest, so evaluating the imported model
    under another CLIP of the same architecture is refused by name (before issue 24 it ran)."""
    import dataclasses

    from cascade_clip.evaluate import load_model
    from cascade_clip.official import import_official

    cfg, _, path, _, clip = release
    weights = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), weights)
    cfg = dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, pretrained=str(weights)))
    out = import_official(cfg, path, tmp_path / "imported.pt")
    load_model(cfg, out, None, torch.device("cpu"))  # its own CLIP: fine
    moved = {k: v + 0.01 if k == "visual.proj" else v for k, v in clip.state_dict().items()}
    torch.save(moved, weights)  # the same architecture, other weights
    with pytest.raises(ValueError, match="imported.pt: trained on another CLIP"):
        load_model(cfg, out, None, torch.device("cpu"))
