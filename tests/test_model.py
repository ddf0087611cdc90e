"""The Cascade-CLIP model in plain PyTorch on a tiny open_clip config (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_clip.config import ClipConfig, ModelConfig
from cascade_clip.inference import calibrate, predict_labels, sliding_window_scores, window_starts
from cascade_clip.model import CascadeCLIP, class_embeddings, load_clip
from cascade_clip.model.head import nga_init


def _clip(cfg_dict, image_size=32):
    cfg = ClipConfig(model="tiny", pretrained="random", model_config=cfg_dict, image_size=image_size)
    return load_clip(cfg)


def _text(k=5, c=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(k, c, generator=g), dim=-1)


def test_forward_shapes(tiny_clip_config, tiny_model_config):
    clip, _ = _clip(tiny_clip_config)
    model = CascadeCLIP(clip, tiny_model_config)
    feats = model.encode(torch.randn(2, 3, 32, 32))
    assert feats.taps.shape == (3, 2, 16, 32)
    assert feats.global_token.shape == (2, 32)
    assert torch.allclose(feats.taps.norm(dim=-1), torch.ones(3, 2, 16), atol=1e-5)
    logits = model(torch.randn(2, 3, 32, 32), _text())
    assert logits.shape == (2, 5, 4, 4)
    # per-image text (B, K, C) works too
    assert model.forward_features(feats, _text().expand(2, -1, -1)).shape == (2, 5, 4, 4)


def test_positional_embedding_resized(tiny_clip_config, tiny_model_config):
    clip, _ = _clip(tiny_clip_config, image_size=48)  # 6x6 grid from a 4x4 one
    assert clip.visual.positional_embedding.shape == (37, 48)
    model = CascadeCLIP(clip, tiny_model_config)
    assert model(torch.randn(1, 3, 48, 48), _text()).shape == (1, 5, 6, 6)


def _backward(model):
    model.train()
    logits = model(torch.randn(2, 3, 32, 32), _text())
    logits.square().mean().backward()


def test_frozen_mode_trains_no_encoder_parameter(tiny_clip_config, tiny_model_config):
    model = CascadeCLIP(_clip(tiny_clip_config)[0], tiny_model_config)
    _backward(model)
    assert all(p.grad is None for p in model.encoder.parameters())
    assert not any(p.requires_grad for p in model.encoder.parameters())
    head_grads = [p.grad for p in model.head.parameters() if p.requires_grad]
    assert head_grads and all(g is not None for g in head_grads)


def test_vpt_mode_trains_only_prompts(tiny_clip_config, tiny_model_config):
    tiny_model_config.encoder_mode = "vpt"
    model = CascadeCLIP(_clip(tiny_clip_config)[0], tiny_model_config)
    _backward(model)
    with_grad = {n for n, p in model.encoder.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    # the prompts and, as in the authors' encoder, prompt_norm
    assert with_grad and all(n.startswith(("prompts.", "prompt_norm.")) for n in with_grad)
    assert {"prompt_norm.weight", "prompt_norm.bias"} <= with_grad


def test_nga_initial_weights(tiny_clip_config):
    assert torch.allclose(nga_init(3, 1.0), torch.tensor([math.exp(-2), math.exp(-0.5), 1.0]))
    cfg = ModelConfig(stages=[[1, 2, 3], [4]])
    cfg.decoder.heads = 2
    model = CascadeCLIP(_clip(tiny_clip_config)[0], cfg)
    assert torch.allclose(
        model.head.fusions[0].weights.detach(), torch.tensor([0.1353, 0.6065, 1.0]), atol=1e-4
    )
    assert model.head.fusions[1].mode == "identity"  # a one-block stage is passed through


def test_nga_fuses_stage_blocks(tiny_clip_config, tiny_model_config):
    model = CascadeCLIP(_clip(tiny_clip_config)[0], tiny_model_config)
    feats = torch.randn(2, 3, 16, 32)
    fused = model.head.fusions[0](feats)
    w = model.head.fusions[0].weights.detach()
    assert torch.allclose(fused, w[0] * feats[0] + w[1] * feats[1], atol=1e-6)


def test_logits_are_head_averaged_attention_logits_summed_over_stages(tiny_clip_config, tiny_model_config):
    torch.manual_seed(0)
    model = CascadeCLIP(_clip(tiny_clip_config)[0], tiny_model_config).eval()
    head = model.head
    feats = model.encode(torch.randn(2, 3, 32, 32))
    text = _text()
    r = head.descriptor(text, feats.global_token)
    expected = torch.zeros(2, 5, 16)
    start = 0
    for s, n in enumerate(head.stage_sizes):
        pixels = head.fusions[s](feats.taps[start : start + n])
        start += n
        q, k = head.decoders[s](head.query_projs[s](r), pixels)
        heads = head.decoders[s].heads
        dh = q.shape[-1] // heads
        qh = q.view(2, 5, heads, dh).transpose(1, 2)
        kh = k.view(2, 16, heads, dh).transpose(1, 2)
        per_head = qh @ kh.transpose(-1, -2) / math.sqrt(dh)  # (B, H, K, N)
        expected += per_head.mean(1)
    logits = head(feats.taps, feats.global_token, text, feats.grid)
    assert torch.allclose(logits.flatten(2), expected, atol=1e-4)


def test_relationship_descriptor(tiny_clip_config, tiny_model_config):
    model = CascadeCLIP(_clip(tiny_clip_config)[0], tiny_model_config)
    t, g = _text(3), _text(2, seed=1)
    r = model.head.descriptor(t, g)
    assert r.shape == (2, 3, 64)
    assert torch.allclose(r[1, 2], torch.cat([t[2] * g[1], t[2]]))
    assert len(model.head.query_projs) == 2  # independent per stage


@pytest.mark.parametrize("fusion", ["sum", "concat", "attention"])
def test_fusion_ablations_run(tiny_clip_config, tiny_model_config, fusion):
    tiny_model_config.fusion = fusion
    tiny_model_config.query_projection = "shared"
    model = CascadeCLIP(_clip(tiny_clip_config)[0], tiny_model_config)
    assert len(model.head.query_projs) == 1
    assert model(torch.randn(1, 3, 32, 32), _text()).shape == (1, 5, 4, 4)


def test_multi_layer_fusion_has_one_decoder(tiny_clip_config, tiny_model_config):
    tiny_model_config.cascade = False
    model = CascadeCLIP(_clip(tiny_clip_config)[0], tiny_model_config)
    assert len(model.head.decoders) == 1 and model.head.stage_sizes == [3]
    assert model(torch.randn(1, 3, 32, 32), _text()).shape == (1, 5, 4, 4)


def test_tap_projection_clip_uses_ln_post_proj(tiny_clip_config, tiny_model_config):
    tiny_model_config.tap_projection = "clip"
    clip = _clip(tiny_clip_config)[0]
    model = CascadeCLIP(clip, tiny_model_config)
    assert len(model.encoder.projections) == 0
    tiny_model_config.tap_projection = "random"
    assert len(CascadeCLIP(clip, tiny_model_config).encoder.projections) == 2  # blocks 2, 3


def test_state_dict_round_trip(tiny_clip_config, tiny_model_config):
    clip_cfg = tiny_clip_config
    a = CascadeCLIP(_clip(clip_cfg)[0], tiny_model_config).eval()
    state = a.trainable_state_dict()
    assert not any(k.startswith("encoder.visual.") for k in state)
    torch.manual_seed(123)
    b = CascadeCLIP(_clip(clip_cfg)[0], tiny_model_config).eval()
    b.load_trainable_state_dict(state)
    x, t = torch.randn(1, 3, 32, 32), _text()
    torch.manual_seed(0)
    clip_b = b.encoder.visual  # same frozen CLIP weights for both
    b.encoder.visual = a.encoder.visual
    assert torch.equal(a(x, t), b(x, t))
    b.encoder.visual = clip_b
    other = ModelConfig(stages=[[4]], decoder=tiny_model_config.decoder)
    with pytest.raises(ValueError, match="does not fit"):
        CascadeCLIP(_clip(clip_cfg)[0], other).load_trainable_state_dict(state)


def test_class_embeddings(tiny_clip_config):
    clip, tokenizer = _clip(tiny_clip_config)
    emb = class_embeddings(clip, tokenizer, ["cat", "red square"], ["a photo of a {}.", "a {}"])
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="empty class list"):
        class_embeddings(clip, tokenizer, [], ["a {}"])


def test_empty_text_is_an_error(tiny_clip_config, tiny_model_config):
    model = CascadeCLIP(_clip(tiny_clip_config)[0], tiny_model_config)
    with pytest.raises(ValueError, match="no classes"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(0, 32))


# --- inference ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(20, 27), (32, 32), (70, 45), (100, 130)])
def test_sliding_window_covers_every_pixel(size):
    h, w = size
    seen = torch.zeros(1, 1, h, w)

    def logits_fn(window):
        assert window.shape[-2:] == (32, 32)
        return torch.zeros(window.shape[0], 3, 4, 4)

    scores = sliding_window_scores(logits_fn, torch.randn(2, 3, h, w), 3, crop=32, stride=24)
    assert scores.shape == (2, 3, h, w)
    assert torch.allclose(scores, torch.full_like(scores, 0.5))  # every pixel averaged, none 0/0
    for y in window_starts(h, 32, 24):
        for x in window_starts(w, 32, 24):
            seen[..., y : y + 32, x : x + 32] = 1
    assert seen.all()


def test_sliding_window_averages_overlaps():
    calls = []

    def logits_fn(window):
        calls.append(1)
        return torch.full((1, 1, 4, 4), float(len(calls)))  # window i scores sigmoid(i)

    scores = sliding_window_scores(logits_fn, torch.zeros(1, 3, 32, 48), 1, crop=32, stride=16)
    assert len(calls) == 2
    mid = torch.sigmoid(torch.tensor([1.0, 2.0])).mean()
    assert torch.isclose(scores[0, 0, 0, 24], mid)
    assert torch.isclose(scores[0, 0, 0, 0], torch.sigmoid(torch.tensor(1.0)))


def test_calibration_touches_only_seen_channels():
    scores = torch.rand(2, 4, 3, 3)
    out = calibrate(scores, seen_ids=[0, 2], amount=0.1)
    assert torch.allclose(out[:, [0, 2]], scores[:, [0, 2]] - 0.1)
    assert torch.equal(out[:, [1, 3]], scores[:, [1, 3]])


def test_predict_labels_resizes_back():
    scores = torch.zeros(1, 3, 4, 4)
    scores[:, 2] = 1
    labels = predict_labels(scores, (9, 7))
    assert labels.shape == (1, 9, 7) and (labels == 2).all()


# --- bad input ---------------------------------------------------------------------------


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        load_clip(ClipConfig(model="ViT-Nope", pretrained="random"))


def test_clip_without_weights_must_be_asked_for_by_name(tiny_clip_config):
    """pretrained: null no longer means a silent random CLIP; "random" is the explicit way."""
    for model_config in (tiny_clip_config, None):
        cfg = ClipConfig(model="ViT-B-16", pretrained=None, model_config=model_config, image_size=32)
        with pytest.raises(ValueError, match="clip.pretrained is None: name the weights.*'random'"):
            load_clip(cfg)
    a, _ = load_clip(ClipConfig(model="t", pretrained="random", model_config=tiny_clip_config, image_size=32))
    b, _ = load_clip(ClipConfig(model="t", pretrained="random", model_config=tiny_clip_config, image_size=32))
    assert torch.equal(a.visual.conv1.weight, b.visual.conv1.weight)  # seeded: the same network


def test_missing_weights_file(tmp_path, tiny_clip_config):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt: weights file not found"):
        load_clip(
            ClipConfig(model="tiny", pretrained=str(missing), model_config=tiny_clip_config, image_size=32)
        )
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_clip(ClipConfig(model="ViT-B-16", pretrained=str(missing)))


def test_corrupt_weights_file(tmp_path, tiny_clip_config):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: cannot read weights"):
        load_clip(ClipConfig(model="tiny", pretrained=str(bad), model_config=tiny_clip_config, image_size=32))


def test_weights_round_trip_through_file(tmp_path, tiny_clip_config):
    clip, _ = _clip(tiny_clip_config)
    # A CLIP built from a model config is always the seed-0 network, so weights saved from
    # one would "load" even if loading did nothing. Save weights that seed 0 does not give.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    fresh, _ = _clip(tiny_clip_config)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(fresh.visual.proj, clip.visual.proj)
    assert not torch.allclose(fresh.encode_image(x), clip.encode_image(x))
    path = tmp_path / "w.pt"
    torch.save({"state_dict": clip.state_dict()}, path)
    clip2, _ = load_clip(
        ClipConfig(model="tiny", pretrained=str(path), model_config=tiny_clip_config, image_size=32)
    )
    saved, loaded = clip.state_dict(), clip2.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(clip2.encode_image(x), clip.encode_image(x))
    wrong = dict(tiny_clip_config, embed_dim=16)
    with pytest.raises(ValueError, match="do not fit"):
        load_clip(ClipConfig(model="tiny", pretrained=str(path), model_config=wrong, image_size=32))


def test_tapped_block_beyond_depth(tiny_clip_config):
    cfg = ModelConfig(stages=[[3, 4], [5]])
    with pytest.raises(ValueError, match=r"tapped block\(s\) \[5\] outside the encoder's 1..4"):
        CascadeCLIP(_clip(tiny_clip_config)[0], cfg)


def test_image_size_not_multiple_of_patch(tiny_clip_config):
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        _clip(tiny_clip_config, image_size=30)
