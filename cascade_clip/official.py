"""Import a checkpoint of the authors' release into this project's checkpoint format.

The release (MMSegmentation) saves a dict whose `state_dict` holds, with W the ViT width,
C the CLIP embedding width, D the decoder width (= C), T the prompt count:

    backbone.prompt_embeddings         (1, T, W)      prompts of block 1
    backbone.deep_prompt_embeddings    (depth-1, T, W) prompts of blocks 2..depth
    backbone.prompt_proj.{weight,bias}, backbone.prompt_norm.{weight,bias}
    backbone.ln_layers.{i}.{weight,bias}, backbone.proj_layers (n, W, C)
                                       the fixed random LN + projection of the i-th tap
                                       before the last block (blocks 6..11 of ViT-B/16)
    backbone.<CLIP visual weights>     OpenAI's layout (conv1.weight, class_embedding, ...)
    decode_head.weights_s{s}           NGA weights of stage s (1-based, multi-block stages)
    decode_head.q_projs.{s}            per-stage query projection (D, 2C)
    decode_head.cascade_decoders.{s}.layers.{l}.
        multihead_attn.{q,k,v,proj}    separate q, k, v Linear layers and the output proj
        linear1, linear2, norm2, norm3 FFN, the norm after attention, the norm after FFN
                                       (norm1 and self_attn exist but are unused; of the
                                       last layer only multihead_attn.q and .k matter)
    decode_head.loss_decode.*          loss buffers; text_encoder.*: the frozen text tower

`import_official` maps these onto `CascadeCLIP.trainable_state_dict()` of the config's
model, checks that the file's frozen CLIP weights are the ones the config loads, and
writes a checkpoint that `evaluate` and `predict` load like any other, with that CLIP's
weights digest (so they refuse it under another CLIP, as any checkpoint). Every problem is
found before anything is written.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cascade_clip.config import Config, ConfigError, config_to_dict
from cascade_clip.errors import MissingInputError

# Keys of the release's file that carry nothing this project computes with.
_IGNORED = (
    re.compile(r"^text_encoder\."),
    re.compile(r"^decode_head\.loss_decode\."),
    re.compile(r"^decode_head\.cascade_decoders\.\d+\.layers\.\d+\.(self_attn|norm1)\."),
    re.compile(r"^backbone\.transformer\.resblocks\.\d+\.attn\.attn_mask$"),
)
# Frozen CLIP tensors must equal the config's CLIP to this tolerance (the positional
# embedding is resized in both, from fp16 weights held in fp32).
_CLIP_ATOL = 1e-5


class OfficialCheckpointError(ConfigError):
    """The release checkpoint does not fit the config (missing/unexpected keys, shapes, CLIP)."""


def read_official_state(path: str | Path, unsafe_load: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) from a release checkpoint, read on the CPU.

    Read with `weights_only=True` unless `unsafe_load` (a pickle from a source you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: release checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        hint = "" if unsafe_load else " (if you trust the file, --unsafe-load reads any pickle)"
        raise OfficialCheckpointError(f"{path}: cannot read ({type(err).__name__}: {err}){hint}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OfficialCheckpointError(f"{path}: no state_dict of tensors in it")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return {k.removeprefix("module."): v for k, v in state.items()}, meta


def official_key_map(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """project trainable key -> the release key(s) it is made of (several are concatenated
    along dim 0: q, k, v into nn.MultiheadAttention's in_proj). The release's deep prompts
    are two tensors, joined along dim 0 like the rest."""
    encoder, head = model.encoder, model.head
    out: dict[str, tuple[str, ...]] = {}
    if encoder.prompts is not None:
        out["encoder.prompts.tokens"] = ("backbone.prompt_embeddings", "backbone.deep_prompt_embeddings")
        for p in ("weight", "bias"):
            out[f"encoder.prompts.prompt_proj.{p}"] = (f"backbone.prompt_proj.{p}",)
            if encoder.prompt_norm is not None:
                out[f"encoder.prompt_norm.{p}"] = (f"backbone.prompt_norm.{p}",)
    for i, block in enumerate(sorted(int(b) for b in encoder.projections)):
        prefix = f"encoder.projections.{block}."
        out[prefix + "ln_weight"] = (f"backbone.ln_layers.{i}.weight",)
        out[prefix + "ln_bias"] = (f"backbone.ln_layers.{i}.bias",)
        out[prefix + "proj"] = (f"backbone.proj_layers[{i}]",)
    for s, fusion in enumerate(head.fusions):
        if fusion.mode == "nga":
            out[f"head.fusions.{s}.weights"] = (f"decode_head.weights_s{s + 1}",)
    for s in range(len(head.query_projs)):
        for p in ("weight", "bias"):
            out[f"head.query_projs.{s}.{p}"] = (f"decode_head.q_projs.{s}.{p}",)
    for s, decoder in enumerate(head.decoders):
        theirs = f"decode_head.cascade_decoders.{s}.layers"
        for lay in range(len(decoder.layers)):
            ours, src = f"head.decoders.{s}.layers.{lay}.", f"{theirs}.{lay}."
            for p in ("weight", "bias"):
                out[ours + f"attn.in_proj_{p}"] = tuple(src + f"multihead_attn.{n}.{p}" for n in "qkv")
                out[ours + f"attn.out_proj.{p}"] = (src + f"multihead_attn.proj.{p}",)
                out[ours + f"ffn.0.{p}"] = (src + f"linear1.{p}",)
                out[ours + f"ffn.3.{p}"] = (src + f"linear2.{p}",)
                out[ours + f"norm1.{p}"] = (src + f"norm2.{p}",)
                out[ours + f"norm2.{p}"] = (src + f"norm3.{p}",)
        last = f"{theirs}.{len(decoder.layers)}.multihead_attn."
        for p in ("weight", "bias"):
            out[f"head.decoders.{s}.q_proj.{p}"] = (last + f"q.{p}",)
            out[f"head.decoders.{s}.k_proj.{p}"] = (last + f"k.{p}",)
    return out


def _last_layer_unused(key: str, model: torch.nn.Module) -> bool:
    """The release keeps the last decoder layer whole; only its q and k reach the output."""
    m = re.match(r"^decode_head\.cascade_decoders\.(\d+)\.layers\.(\d+)\.(.+)$", key)
    if not m or int(m.group(1)) >= len(model.head.decoders):
        return False
    last = len(model.head.decoders[int(m.group(1))].layers)
    return int(m.group(2)) == last and not m.group(3).startswith(("multihead_attn.q.", "multihead_attn.k."))


def _source_tensor(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key.startswith("backbone.proj_layers["):
        return state["backbone.proj_layers"][int(key[len("backbone.proj_layers[") : -1])]
    return state[key]


def convert_official_state(
    state: dict[str, torch.Tensor], model: torch.nn.Module, where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The release's state dict -> `model.trainable_state_dict()` layout, checked.

    Raises OfficialCheckpointError listing missing keys, unexpected keys and shape
    mismatches together.
    """
    own = model.trainable_state_dict()
    key_map = official_key_map(model)
    unmapped = sorted(set(own) - set(key_map))
    if unmapped:  # the config builds parameters the release has no counterpart for
        raise OfficialCheckpointError(
            f"{where}: the config builds parameters the release does not have: {unmapped[:6]} "
            "(turn off model.decoder.input_adapter / use tap_projection: random, fusion: nga, "
            "query_projection: independent)"
        )
    needed = {k.split("[")[0] for srcs in key_map.values() for k in srcs}
    clip_keys = {f"backbone.{k}" for k in model.encoder.visual.state_dict()}
    missing = sorted((needed | clip_keys) - set(state))
    unexpected = sorted(
        k
        for k in state
        if k not in needed
        and k not in clip_keys
        and not any(p.match(k) for p in _IGNORED)
        and not _last_layer_unused(k, model)
    )
    converted: dict[str, torch.Tensor] = {}
    wrong: list[str] = []
    n_proj, proj = len(model.encoder.projections), state.get("backbone.proj_layers")
    if proj is not None and proj.shape[0] != n_proj:
        wrong.append(f"backbone.proj_layers holds {proj.shape[0]} taps, the config {n_proj}")
    if not missing and not wrong:
        for ours, srcs in key_map.items():
            parts = [_source_tensor(state, k) for k in srcs]
            want = tuple(own[ours].shape)
            if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
                wrong.append(f"{'+'.join(srcs)} {[tuple(p.shape) for p in parts]} (config wants {want})")
                continue
            tensor = torch.cat(parts, dim=0)
            if tuple(tensor.shape) != want:
                wrong.append(f"{'+'.join(srcs)} {tuple(tensor.shape)} (config wants {want})")
            converted[ours] = tensor.to(own[ours].dtype)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if wrong:
            parts.append(f"wrong shape {wrong[:4]}")
        raise OfficialCheckpointError(f"{where}: does not fit the config: {'; '.join(parts)}")
    return converted


def check_frozen_clip(state: dict[str, torch.Tensor], visual: torch.nn.Module, where: str) -> None:
    """The release's `backbone.<CLIP>` tensors must be the CLIP the config loads; names the
    first that differs."""
    for key, ours in visual.state_dict().items():
        theirs = state[f"backbone.{key}"]
        if tuple(theirs.shape) != tuple(ours.shape):
            raise OfficialCheckpointError(
                f"{where}: frozen CLIP tensor backbone.{key} has shape {tuple(theirs.shape)}, the "
                f"config's CLIP {tuple(ours.shape)} (clip.model / clip.image_size)"
            )
        diff = (theirs.float() - ours.float()).abs().max().item() if ours.numel() else 0.0
        if not diff <= _CLIP_ATOL * max(1.0, ours.float().abs().max().item()):
            raise OfficialCheckpointError(
                f"{where}: frozen CLIP tensor backbone.{key} differs from the CLIP the config loads "
                f"(max |diff| {diff:.3g}): another CLIP, or another clip.pos_resize"
            )


def check_class_count(state: dict[str, torch.Tensor], num_seen: int, num_all: int, where: str) -> None:
    """The release's loss keeps a (classes + 1) buffer; its class count must be the config's
    seen or total class count."""
    for key, value in state.items():
        if key.endswith("loss_decode.criterion.empty_weight"):
            trained = value.numel() - 1
            if trained not in (num_seen, num_all):
                raise OfficialCheckpointError(
                    f"{where}: trained for {trained} classes; the config's dataset has {num_seen} "
                    f"seen of {num_all} (dataset.name / dataset.unseen)"
                )


def import_official(
    cfg: Config,
    checkpoint: str | Path,
    out: str | Path,
    setting: str | None = None,
    unsafe_load: bool = False,
) -> Path:
    """Convert a release checkpoint for config `cfg`; returns the written project checkpoint.

    `setting` ("inductive" or "transductive"; default `cfg.train.setting`) is what the
    released model was trained as: evaluation applies the seen calibration to inductive
    models only.
    """
    from cascade_clip.cache import file_sha256, weights_digest
    from cascade_clip.checkpoint import CHECKPOINT_VERSION, save_checkpoint
    from cascade_clip.data import get_spec, load_classes
    from cascade_clip.data.registry import unseen_class_names
    from cascade_clip.model import CascadeCLIP, load_clip

    setting = setting or cfg.train.setting
    if setting not in ("inductive", "transductive", "fully_supervised"):
        raise ConfigError(f"--setting must be inductive, transductive or fully_supervised, got {setting!r}")
    where = str(checkpoint)
    state, meta = read_official_state(checkpoint, unsafe_load)
    root = Path(cfg.dataset.root)
    names = load_classes(root) if (root / "dataset.json").is_file() else get_spec(cfg.dataset.name).classes
    unseen = unseen_class_names(cfg.dataset.name, cfg.dataset.unseen, cfg.dataset.root)
    check_class_count(state, len(names) - len(unseen), len(names), where)

    clip, _ = load_clip(cfg.clip)
    model = CascadeCLIP(clip, cfg.model)
    weights = convert_official_state(state, model, where)
    check_frozen_clip(state, model.encoder.visual, where)
    model.load_trainable_state_dict(weights)  # the same check evaluate applies

    ckpt = {
        "version": CHECKPOINT_VERSION,
        "model": model.trainable_state_dict(),
        "config": config_to_dict(cfg),
        "step": int(meta.get("iter", 0) or 0),
        "classes": list(names),
        "unseen": list(unseen),
        "setting": setting,
        "clip_weights": weights_digest(cfg.clip),  # evaluate refuses it under another CLIP
        "imported_from": {"path": str(checkpoint), "sha256": file_sha256(checkpoint)},
    }
    return save_checkpoint(ckpt, out)
