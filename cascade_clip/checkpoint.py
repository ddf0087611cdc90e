"""Checkpoints: written atomically, read with `weights_only=True`, checked against the config.

A checkpoint is a plain dict of tensors and Python primitives (so `torch.load(...,
weights_only=True)` can read it without executing code):

    version      CHECKPOINT_VERSION
    model        CascadeCLIP.trainable_state_dict()
    config       config_to_dict(cfg) of the run that wrote it
    step         iterations done
    classes      all class names of the training dataset (train-id order)
    unseen       the unseen class names
    setting      "inductive" | "transductive" | "fully_supervised"
    clip_weights the frozen CLIP's weights digest (cascade_clip.cache.weights_digest)
    inputs       (training runs) digests of what the run consumed: clip, text, init, cache,
                 dataset (cascade_clip.train.provenance); a resume compares them
    dataset_files (training runs) the dataset files' paths, sizes and times, digested
  and, in a resumable checkpoint (ckpt_last.pt) only:
    optimizer    AdamW state_dict
    scheduler    {"name": "warmup_poly", "step": step} (the lr is a function of the step)
    sampler      {"consumed": global samples consumed, "seed": sampler seed}
    rng          one dict per rank: torch / cuda / numpy / python generator states
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade_clip.config import Config
from cascade_clip.errors import InputError, MissingInputError

# 2: decoder input adapter optional (model.decoder.input_adapter), vpt prompt_norm, CLS mode.
CHECKPOINT_VERSION = 2

# ModelConfig fields that change neither the trainable tensors nor what they compute in
# training: a checkpoint may be evaluated with another value.
INFERENCE_ONLY_FIELDS = ("seen_calibration",)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically: a temporary file in the same folder, flushed to
    disk, then renamed over `path`. A crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on CPU with `weights_only=True`; a missing, corrupt or foreign
    file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise InputError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise InputError(f"{path}: not a cascade-clip checkpoint (no 'model' and 'config' entries)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise InputError(
            f"{path}: checkpoint version {state.get('version')!r}, this code reads {CHECKPOINT_VERSION}"
        )
    return state


def _flatten(data: Any, prefix: str) -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}"))
        return out
    if isinstance(data, tuple):
        data = list(data)
    return {prefix: data}


def model_signature(config: dict[str, Any]) -> dict[str, Any]:
    """The config values a checkpoint's tensors depend on, flattened to dotted keys:
    the `model` section (less inference-only fields), the CLIP model name and how its
    positional embedding was resized."""
    model = {k: v for k, v in config.get("model", {}).items() if k not in INFERENCE_ONLY_FIELDS}
    sig = _flatten(model, "model")
    sig["clip.model"] = config.get("clip", {}).get("model")
    sig["clip.pos_resize"] = config.get("clip", {}).get("pos_resize")
    return sig


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two configs' model signatures."""
    a, b = model_signature(saved), model_signature(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: checkpoint {a.get(key)!r}, config {b.get(key)!r}")
    return diffs


def check_model_config(state: dict[str, Any], cfg: Config, path: str | Path) -> None:
    """Refuse a checkpoint written for another model configuration, saying what differs."""
    from cascade_clip.config import config_to_dict

    diffs = config_differences(state["config"], config_to_dict(cfg))
    if diffs:
        raise InputError(f"{path}: checkpoint is from a different model config: {'; '.join(diffs)}")


def check_checkpoint(
    state: dict[str, Any],
    cfg: Config,
    path: str | Path,
    classes: Sequence[str] | None = None,
    unseen: Sequence[str] | None = None,
) -> None:
    """Refuse a checkpoint that does not fit `cfg`: another model config, another frozen
    CLIP (by weights digest), or, when given, another class list or unseen split."""
    from cascade_clip.cache import weights_digest

    check_model_config(state, cfg, path)
    saved = state.get("clip_weights")
    if saved is not None:
        current = weights_digest(cfg.clip)
        if saved != current:
            raise InputError(
                f"{path}: trained on another CLIP (weights {saved}); the config loads {current} "
                "(clip.model / clip.pretrained / clip.model_config)"
            )
    if classes is not None and "classes" in state and list(state["classes"]) != list(classes):
        raise InputError(
            f"{path}: trained on classes {list(state['classes'])[:4]}... ({len(state['classes'])}); "
            f"dataset {cfg.dataset.name} has {list(classes)[:4]}... ({len(classes)}) "
            "(dataset.name / dataset.root)"
        )
    if unseen is not None and "unseen" in state and sorted(state["unseen"]) != sorted(unseen):
        raise InputError(
            f"{path}: trained with unseen classes {sorted(state['unseen'])}; the config's are "
            f"{sorted(unseen)} (dataset.unseen)"
        )


def rng_state() -> dict[str, Any]:
    """This process's generator states (torch CPU and CUDA, numpy, python), as tensors and
    primitives so that `weights_only` loading accepts them."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rank_rng(saved: list[dict[str, Any]], rank: int, seed: int, step: int) -> bool:
    """Restore this rank's generators from a checkpoint's per-rank states; True if restored.

    A rank the checkpoint has no state for (the world grew on resume) gets a fresh stream
    seeded from (seed, rank, step), never a copy of another rank's: identical streams
    would give identical dropout and augmentation on two ranks. Returns False then.
    """
    if rank < len(saved):
        set_rng_state(saved[rank])
        return True
    fresh = (seed * 1_000_003 + rank * 7_919 + step) % (2**63)
    random.seed(fresh)
    np.random.seed(fresh % (2**32))
    torch.manual_seed(fresh)
    return False
