"""CLIP weights from a file and the text tower's prompt length (found by the rehearsals,
tests/test_rehearsal.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from cascade_clip.config import ClipConfig
from cascade_clip.model.clip_loader import load_clip
from cascade_clip.model.text import class_embeddings, encode_prompts, get_templates, prompt_length


@pytest.fixture(scope="module")
def tiny_clip():
    """A tiny open_clip CLIP with CLIP's own text tower (causal, argmax pooling), 77 tokens."""
    from cascade_clip.testing import tiny_clip_config

    cfg = tiny_clip_config()
    cfg["text_cfg"]["context_length"] = 77
    return load_clip(ClipConfig(model="tiny", pretrained="random", model_config=cfg, image_size=32))


def test_prompts_encode_on_their_own_length_to_the_same_embeddings(tiny_clip):
    model, tokenizer = tiny_clip
    tokens = tokenizer([t.format("wall-concrete") for t in get_templates("official-multi")])
    length = prompt_length(model, tokens)
    assert 6 < length < 20  # the longest prompt's end token, not the 77 positions
    with torch.no_grad():
        full = model.encode_text(tokens)
        short = encode_prompts(model, tokens)
    assert torch.allclose(short, full, atol=1e-5)
    # The model is as it was: full length again, the same embeddings.
    assert model.positional_embedding.shape[0] == 77 and model.attn_mask.shape == (77, 77)
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), full)


def test_class_embeddings_do_not_depend_on_the_padding(tiny_clip):
    model, tokenizer = tiny_clip
    names = ["sky-other", "a very long class name with many words in it", "cow"]
    got = class_embeddings(model, tokenizer, names, get_templates("official-multi"))
    with torch.no_grad():
        want = []
        for name in names:
            tokens = tokenizer([t.format(name) for t in get_templates("official-multi")])
            emb = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
            want.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    assert torch.allclose(got, torch.stack(want), atol=1e-5)


def test_other_text_towers_are_left_alone(tiny_clip):
    model, tokenizer = tiny_clip
    tokens = tokenizer(["a photo of a cow."])
    model.text_pool_type = "last"  # pooling that reads the padding: no shortcut
    try:
        assert prompt_length(model, tokens) is None
    finally:
        model.text_pool_type = "argmax"
    mask = model.attn_mask
    model.attn_mask = torch.zeros_like(mask)  # not causal: no shortcut
    try:
        assert prompt_length(model, tokens) is None
    finally:
        model.attn_mask = mask


def test_weights_from_a_file_do_not_log_a_random_init(tmp_path, caplog, tiny_clip):
    """open_clip logs "Model initialized randomly" for the model it builds before the file's
    weights are loaded into it: a real run's log must not say so."""
    import open_clip

    torch.manual_seed(1)
    net = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    path = tmp_path / "vit-b-32.pt"
    torch.save(net.state_dict(), path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model, _ = load_clip(ClipConfig(model="ViT-B-32-quickgelu", pretrained=str(path), image_size=224))
    assert "initialized randomly" not in caplog.text
    assert torch.equal(model.visual.conv1.weight, net.visual.conv1.weight)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_clip(ClipConfig(model="ViT-B-32-quickgelu", pretrained="random", image_size=224))
    assert "initialized randomly" in caplog.text  # true there
