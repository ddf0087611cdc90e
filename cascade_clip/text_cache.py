"""Cached class text embeddings (docs/design.md: The model, text).

Per dataset and template set, the (K, C) float32 embeddings of ALL the dataset's class prompts
(train-id order: one per class, several for VOC-21's background, `query_names`) are computed
once with the frozen text tower and stored in HDF5::

    /embeddings   (K, C) float32, L2-normalised rows
    /class_names  (K,)   UTF-8 strings
    attrs: kind, format_version, code_version, model, weights_digest, template_set,
           templates (JSON list), dataset, num_classes, embed_dim, created

The file is written to `<out>.partial` and renamed. `load_text_embeddings` refuses a file
whose model, weights, template set, templates, dataset or class names differ from the
config, naming the field. `text_embeddings` gives training and evaluation their class
embeddings: from such a file, or computed now.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

import cascade_clip
from cascade_clip.cache.provenance import CacheError, CacheMismatchError, open_h5, read_attrs, weights_digest
from cascade_clip.cache.write import partial_path
from cascade_clip.config import Config
from cascade_clip.errors import InputError

TEXT_FORMAT_VERSION = 1
TEXT_KIND = "cascade-clip/text-embeddings"


def dataset_classes(cfg: Config) -> list[str]:
    """All class names of `cfg.dataset` in train-id order: from `<root>/dataset.json` when
    the dataset is prepared, else from the registry."""
    from cascade_clip.data import get_spec, load_classes

    root = Path(cfg.dataset.root)
    if (root / "dataset.json").is_file():
        return list(load_classes(root))
    return list(get_spec(cfg.dataset.name).classes)


def query_names(cfg: Config, classes: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The prompt names `cfg.dataset`'s classes are scored with, flattened in class order
    (`registry.class_prompts`: each class's name, VOC-21's background the protocol's prompts)."""
    from cascade_clip.data.registry import class_prompts

    classes = dataset_classes(cfg) if classes is None else classes
    return [p for ps in class_prompts(cfg.dataset.name, classes, cfg.evaluate.voc21_background) for p in ps]


def text_provenance(cfg: Config, class_names: list[str] | None = None) -> dict[str, Any]:
    """The attributes a text-embedding file must share with the config that reads it."""
    from cascade_clip.model import config_templates

    template_set, templates = config_templates(cfg)
    return {
        "format_version": TEXT_FORMAT_VERSION,
        "model": cfg.clip.model,
        "weights_digest": weights_digest(cfg.clip),
        "template_set": template_set,
        "templates": json.dumps(list(templates)),
        "prompt_names": cfg.clip.prompt_names,
        "dataset": cfg.dataset.name,
        "class_names": class_names if class_names is not None else query_names(cfg),
    }


def compute_text_embeddings(
    cfg: Config, clip_model: torch.nn.Module | None = None, tokenizer: Any = None, device: str | None = None
) -> tuple[torch.Tensor, list[str]]:
    """(Q, C) float32 embeddings of every prompt of `cfg.dataset`'s classes (`query_names`), and
    those names."""
    from cascade_clip.model import config_class_embeddings, load_clip

    if clip_model is None:
        clip_model, tokenizer = load_clip(cfg.clip)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clip_model = clip_model.to(device).eval()
    names = query_names(cfg)
    emb = config_class_embeddings(cfg, clip_model, tokenizer, names, device)
    return emb.float().cpu(), names


def write_text_embeddings(path: str | Path, cfg: Config, embeddings: torch.Tensor, names: list[str]) -> Path:
    """Store `embeddings` (K, C) with provenance; written to a temp name, then renamed."""
    path = Path(path)
    if embeddings.dim() != 2 or embeddings.shape[0] != len(names):
        raise InputError(f"{path}: embeddings {tuple(embeddings.shape)} do not fit {len(names)} class names")
    if not torch.isfinite(embeddings).all():
        raise InputError(f"{path}: non-finite text embeddings, refusing to store them")
    prov = text_provenance(cfg, names)
    tmp = partial_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("embeddings", data=embeddings.detach().cpu().float().numpy())
            f.create_dataset("class_names", data=np.array(names, dtype=h5py.string_dtype()))
            for key, value in prov.items():
                if key != "class_names":
                    f.attrs[key] = value
            f.attrs.update(
                kind=TEXT_KIND,
                code_version=cascade_clip.__version__,
                num_classes=len(names),
                embed_dim=int(embeddings.shape[1]),
                created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            )
    except OSError as err:
        raise CacheError(f"{tmp}: cannot write text embeddings ({err})") from None
    os.replace(tmp, path)
    return path


def load_text_embeddings(path: str | Path, cfg: Config) -> tuple[torch.Tensor, list[str]]:
    """(K, C) float32 tensor and the class names, after checking provenance against `cfg`."""
    path = Path(path)
    with open_h5(path) as f:
        attrs = read_attrs(f)
        if attrs.get("kind") != TEXT_KIND:
            raise CacheError(f"{path}: not a cascade-clip text-embedding file (kind={attrs.get('kind')!r})")
        try:
            emb = torch.from_numpy(f["embeddings"][:]).float()
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["class_names"][:]]
        except (KeyError, OSError) as err:
            raise CacheError(f"{path}: unreadable text embeddings ({err})") from None
    wanted = text_provenance(cfg)
    attrs["class_names"] = names
    for field, want in wanted.items():
        if attrs.get(field) != want:
            raise CacheMismatchError(
                path, field, attrs.get(field), want, "recompute with cascade-clip text-embeddings"
            )
    if emb.dim() != 2 or emb.shape[0] != len(names) or not torch.isfinite(emb).all():
        raise CacheError(f"{path}: embeddings {tuple(emb.shape)} are malformed or non-finite")
    return emb, names


def text_embeddings(
    cfg: Config,
    names: tuple[str, ...],
    text_path: str | Path | None,
    clip: torch.nn.Module,
    tokenizer: Any,
    device: torch.device,
) -> torch.Tensor:
    """(K_all, C) float32 class embeddings on `device`: from the text cache if given, else
    computed now with the frozen text tower and the config's template set."""
    if text_path is None:
        from cascade_clip.model import config_class_embeddings

        return config_class_embeddings(cfg, clip, tokenizer, names, device)
    emb, cached_names = load_text_embeddings(text_path, cfg)
    if tuple(cached_names) != tuple(names):
        raise InputError(
            f"{text_path}: text embeddings are for classes {list(cached_names)[:4]}..., "
            f"the dataset has {list(names)[:4]}... ({len(cached_names)} vs {len(names)})"
        )
    return emb.float().to(device)
