"""What an experiment will download, write and (where measured) how long it takes.

`cascade-clip plan --config C` prints, before anything runs, for the workflow of one
config (its dataset, its `cross_eval` targets, every run of `ablations` and the
self-training run):

- **downloads**: each archive's size from `cascade_clip/data/sources.yaml` (`size`, exact
  or `size_approximate`, or unknown);
- **extracted and converted data**: an extracted zip or tar holds about what the archive
  does (already-compressed JPEG/PNG members, an uncompressed tar); a `.tgz` is unknown.
  `prepare` hard-links images (no extra bytes on the downloads' file system) and writes
  one label PNG per image (about the source label maps for COCO-Stuff, whose converted
  labels are those maps re-indexed; unknown for VOC and Context);
- **the feature cache**, only when some run trains from it (`model.encoder_mode: frozen`),
  from the shard layout of `cascade_clip.cache` exactly: per (image, view) row, the taps
  (L tapped blocks x N tokens x C channels, fp16), the global token (C, fp16) and the
  per-row metadata (image index int64, view index int16, id S<n>, view JSON S512, class
  presence uint8 x K, done flag uint8);
- **checkpoints** per run: the trainable state dict (`CascadeCLIP.trainable_state_dict`:
  head, vpt prompts, fixed random tap projections) in ckpt_half.pt and model_final.pt, plus
  AdamW's two moments and a step counter per trainable tensor in ckpt_last.pt. Counts come
  from the model classes themselves, built with the vision tower on the meta device: no
  CLIP weights are read and nothing touches the network;
- **time**, only where benchmarks/NOTES.md holds a measured figure for the same setup
  (`MEASURED`), else "not measured".

`check_cache_space` is the cache writer's guard: it refuses a shard the file system cannot
hold, naming the folder, the bytes needed and free, and the config keys that shrink it.

Sizes print in decimal units (1 GB = 10^9 bytes).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shutil
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cascade_clip.config import Config, config_schema, load_config
from cascade_clip.errors import InputError, MissingInputError

# --- known facts about the real datasets ---------------------------------------------------

# Images per split (the converters' output; cascade_clip.data.registry descriptions) and the
# length of an image id in bytes (COCO "000000000009", VOC/Context "2008_000002"), used until
# the dataset is prepared; afterwards its split lists are read instead.
KNOWN_SPLITS: dict[str, dict[str, int]] = {
    "coco_stuff_164k": {"train": 118_287, "val": 5_000},
    "voc12": {"train": 10_582, "val": 1_449},
    "pascal_context_59": {"train": 4_996, "val": 5_104},
}
KNOWN_ID_BYTES = {"coco_stuff_164k": 12, "voc12": 11, "pascal_context_59": 11, "shapes": 12}
# Label archives whose maps `prepare` re-indexes one to one (converted labels ~ the same size).
LABEL_ARCHIVES = {"coco_stuff_164k": "stuffthingmaps_trainval2017.zip"}

# HDF5 bookkeeping of a shard beyond its datasets' raw bytes (superblock, object headers,
# attributes, chunk index): ~17 kB plus ~65 B per row on tiny shards of 10-2000 rows
# (tests/test_plan.py checks the allowance holds); the space check adds this allowance.
SHARD_OVERHEAD_FIXED = 1 << 20
SHARD_OVERHEAD_PER_ROW = 256

# The shapes demo's generated data, measured (2026-11-29, fifth session, the 2-core development VM,
# `cascade-clip make-shapes --config config/config.yaml`; `pretrain-clip` for the CLIP's
# checkpoint.pt, whose size does not depend on the steps). The world's figure applies when
# the `shapes` section holds exactly these settings (any seed); the CLIP's when these
# `pretrain` keys match.
SHAPES_MEASURED = {"num_pretrain": 2000, "num_train": 2000, "num_val": 400, "num_test": 400,
                   "image_size": 128, "max_things": 3}
SHAPES_WORLD_BYTES = 177_157_698  # apparent size (du -b)
SHAPES_CLIP_MEASURED = {"width": 128, "layers": 6, "heads": 4, "patch_size": 8, "embed_dim": 128,
                        "text": "minilm"}
SHAPES_CLIP_BYTES = 95_575_935


class NotEnoughSpaceError(InputError):
    """The file system cannot hold what a stage is about to write."""


# --- small helpers ---------------------------------------------------------------------------


def fmt_bytes(n: int | float | None, approx: bool = False) -> str:
    """12345678 -> '12.3 MB' (decimal units, 3 significant digits); None -> '?'."""
    if n is None:
        return "?"
    prefix = "~" if approx else ""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(value) < 1000 or unit == "PB":
            break
        value /= 1000
    if unit == "B":
        return f"{prefix}{int(n)} B"
    digits = 2 if value < 10 else 1 if value < 100 else 0
    return f"{prefix}{value:.{digits}f} {unit}"


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def existing_ancestor(path: str | Path) -> Path:
    """`path` or its nearest existing parent (where a folder about to be made would live)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def same_file_system(a: str | Path, b: str | Path) -> bool:
    return existing_ancestor(a).stat().st_dev == existing_ancestor(b).stat().st_dev


def _dotted(data: dict[str, Any], key: str, default: Any = None) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


@dataclass
class Size:
    """A byte count that may be approximate or unknown (None)."""

    bytes: int | None
    approx: bool = False

    def __str__(self) -> str:
        return fmt_bytes(self.bytes, self.approx)


def total(sizes: list[Size]) -> Size:
    known = [s for s in sizes if s.bytes is not None]
    return Size(sum(s.bytes for s in known) if known else None, any(s.approx for s in known))


# --- the workflow's runs ---------------------------------------------------------------------


def workflow_settings(cfg: Config) -> dict[str, Any]:
    """The config's `workflow` section with the schema's defaults filled in."""
    props = config_schema()["properties"]["workflow"]["properties"]
    wf = {k: v.get("default") for k, v in props.items()}
    wf.update(cfg.extra.get("workflow") or {})
    return wf


def runs_of(cfg: Config) -> dict[str, dict[str, Any]]:
    """run name -> its config overrides, as workflow/rules/common.smk defines them."""
    ablations = cfg.extra.get("ablations")
    if ablations is None:
        ablations = config_schema()["properties"]["ablations"]["default"]
    wf = workflow_settings(cfg)
    main = wf["main_run"]
    if main not in ablations:
        raise InputError(f"workflow.main_run {main!r} is not one of the ablations {list(ablations)}")
    runs = {name: dict(ov or {}) for name, ov in ablations.items()}
    if wf["self_train"]:
        runs[f"{main}_st"] = dict(runs[main], **{"train.setting": "transductive"})
    return runs


def run_configs(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Config]:
    """Each run's effective config: the config, `--set` overrides, then the run's own."""
    base = load_config(path, overrides)
    return {name: load_config(path, {**(overrides or {}), **ov}) for name, ov in runs_of(base).items()}


# --- the model, without weights --------------------------------------------------------------


def clip_model_config(cfg: Config) -> dict[str, Any]:
    """The open_clip model config of `cfg.clip` (embed_dim, vision_cfg, ...), read offline.

    A model_config file that does not exist yet is the shapes demo's, written by
    `pretrain-clip` from the config's `pretrain` section: it is derived from that section.
    """
    clip = cfg.clip
    if clip.model_config is not None:
        if isinstance(clip.model_config, dict):
            return json.loads(json.dumps(clip.model_config))
        path = Path(clip.model_config)
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise InputError(f"{path}: not valid JSON ({err})") from None
        if "pretrain" in cfg.extra:
            from cascade_clip.pretrain import PretrainConfig, model_config

            return model_config(PretrainConfig.from_dict(cfg.extra["pretrain"]))
        raise MissingInputError(f"{path}: open_clip model config (clip.model_config) not found")
    import open_clip

    mc = open_clip.get_model_config(clip.model)
    if mc is None:
        raise InputError(f"clip.model {clip.model!r}: no open_clip model config of that name "
                         "(see open_clip.list_models(), or give clip.model_config)")
    return mc


def meta_vision_tower(cfg: Config) -> Any:
    """The open_clip vision tower of `cfg.clip` with its tensors on the meta device."""
    import torch
    from open_clip.model import _build_vision_tower

    mc = clip_model_config(cfg)
    if "vision_cfg" not in mc or "embed_dim" not in mc:
        raise InputError(f"clip {cfg.clip.model!r}: model config lacks vision_cfg/embed_dim")
    with torch.device("meta"):
        return _build_vision_tower(mc["embed_dim"], mc["vision_cfg"], quick_gelu=bool(mc.get("quick_gelu")))


@dataclass
class EncoderShape:
    layers: int
    width: int
    patch_size: int
    embed_dim: int

    def describe(self) -> str:
        return f"ViT {self.layers} blocks x {self.width}, patch {self.patch_size}, embed {self.embed_dim}"


def encoder_shape(visual: Any) -> EncoderShape:
    if getattr(visual, "conv1", None) is None or getattr(visual, "proj", None) is None:
        raise InputError("the CLIP's vision tower is not an open_clip VisionTransformer with conv1/proj")
    return EncoderShape(len(visual.transformer.resblocks), visual.conv1.out_channels,
                        visual.conv1.kernel_size[0], int(visual.proj.shape[1]))


@dataclass
class CheckpointSizes:
    """Bytes of a run's checkpoints (tensor payload; the files add a few kB of metadata)."""

    state_values: int  # elements in the trainable state dict (parameters and fixed buffers)
    model_bytes: int  # the state dict's tensors: ckpt_half.pt and model_final.pt
    trainable_params: int
    trainable_tensors: int
    optimizer_bytes: int  # AdamW: exp_avg + exp_avg_sq (parameter dtype) + a fp32 step each

    @property
    def last_bytes(self) -> int:
        """ckpt_last.pt: the weights and the optimiser state."""
        return self.model_bytes + self.optimizer_bytes

    @property
    def run_bytes(self) -> int:
        """ckpt_half.pt + model_final.pt + ckpt_last.pt."""
        return 2 * self.model_bytes + self.last_bytes


def checkpoint_sizes(cfg: Config, visual: Any = None) -> tuple[CheckpointSizes, EncoderShape]:
    """What one run of `cfg` keeps in its checkpoints, from the model built on `visual`
    (default: the config's vision tower on the meta device)."""
    from cascade_clip.model import CascadeCLIP

    visual = meta_vision_tower(cfg) if visual is None else visual
    shape = encoder_shape(visual)
    model = CascadeCLIP(types.SimpleNamespace(visual=visual), cfg.model)  # the head on the CPU
    state = model.trainable_state_dict()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in params)
    return CheckpointSizes(
        state_values=sum(t.numel() for t in state.values()),
        model_bytes=sum(t.numel() * t.element_size() for t in state.values()),
        trainable_params=sum(p.numel() for p in params),
        trainable_tensors=len(params),
        optimizer_bytes=2 * trainable_bytes + 4 * len(params),
    ), shape


# --- datasets ----------------------------------------------------------------------------------


@dataclass
class SplitFacts:
    images: int | None
    id_bytes: int | None
    source: str  # where the count comes from


def _prepared_ids(root: str | Path, split: str) -> list[str] | None:
    path = Path(root) / "splits" / f"{split}.txt"
    if not (Path(root) / "dataset.json").is_file() or not path.is_file():
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def split_facts(cfg: Config, name: str, root: str, split: str) -> SplitFacts:
    ids = _prepared_ids(root, split)
    if ids is not None:
        return SplitFacts(len(ids), max((len(i.encode()) for i in ids), default=1),
                          f"the prepared split list {Path(root) / 'splits' / (split + '.txt')}")
    if name == "shapes":
        from cascade_clip.data.shapes import generate_shapes

        params = inspect.signature(generate_shapes).parameters
        section = cfg.extra.get("shapes") or {}
        counts = {s: section.get(f"num_{s}", params[f"num_{s}"].default) for s in ("train", "val")}
        return SplitFacts(counts.get(split), KNOWN_ID_BYTES["shapes"], f"shapes.num_{split}")
    return SplitFacts(KNOWN_SPLITS.get(name, {}).get(split), KNOWN_ID_BYTES.get(name),
                      f"the published size of {name} {split}")


def num_classes(name: str, root: str) -> int:
    from cascade_clip.data.registry import get_spec, load_classes

    if (Path(root) / "dataset.json").is_file():
        return len(load_classes(root))
    return get_spec(name).num_classes


# --- the feature cache -------------------------------------------------------------------------


@dataclass
class CacheRow:
    """One (image, view) row of a feature shard (cascade_clip.cache's layout)."""

    num_taps: int  # L
    num_tokens: int  # N = h * w
    embed_dim: int  # C
    classes: int  # K
    id_bytes: int

    @property
    def taps(self) -> int:
        """/taps: L x N x C fp16."""
        return self.num_taps * self.num_tokens * self.embed_dim * np.dtype(np.float16).itemsize

    @property
    def global_token(self) -> int:
        """/global_token: C fp16."""
        return self.embed_dim * np.dtype(np.float16).itemsize

    @property
    def metadata(self) -> int:
        """/image_index int64, /view_index int16, /ids S<n>, /view S512, /present uint8 x K, /done uint8."""
        from cascade_clip.cache import VIEW_BYTES

        u8 = np.dtype(np.uint8).itemsize
        return (np.dtype(np.int64).itemsize + np.dtype(np.int16).itemsize + self.id_bytes + VIEW_BYTES
                + self.classes * u8 + u8)

    @property
    def total(self) -> int:
        return self.taps + self.global_token + self.metadata

    def shard_bytes(self, rows: int) -> int:
        """Raw bytes of a shard of `rows` rows: every dataset allocated in full at creation,
        /global_token in chunks of up to GLOBAL_CHUNK_ROWS rows (the last one whole)."""
        from cascade_clip.cache import GLOBAL_CHUNK_ROWS

        if rows == 0:
            return 0
        chunk = min(rows, GLOBAL_CHUNK_ROWS)
        global_rows = -(-rows // chunk) * chunk
        return rows * (self.taps + self.metadata) + global_rows * self.global_token


def cache_row_for(cfg: Config, shape: EncoderShape, classes: int, id_bytes: int) -> CacheRow:
    from cascade_clip.cache import tapped_blocks

    side = cfg.train.augment.crop_size // shape.patch_size
    return CacheRow(len(tapped_blocks(cfg)), side * side, shape.embed_dim, classes, id_bytes)


def index_row_bytes(classes: int, id_bytes: int) -> int:
    """Per-row bytes of the joined index (image_index, view_index, view, present, ids)."""
    from cascade_clip.cache import VIEW_BYTES

    return 8 + 2 + VIEW_BYTES + classes + id_bytes


def shard_allowance(rows: int) -> int:
    return SHARD_OVERHEAD_FIXED + SHARD_OVERHEAD_PER_ROW * rows


def shard_data_bytes(cfg: Config, split: str, shard: tuple[int, int], visual: Any = None) -> tuple[int, int]:
    """(raw dataset bytes, rows) of shard `shard` = (I, N) of `split`, from the prepared
    dataset's split list, exactly as `cascade_clip.cache.write_shard` lays it out."""
    from cascade_clip.cache import shard_range
    from cascade_clip.classes import config_unseen_names
    from cascade_clip.data.dataset import SegmentationDataset

    data = SegmentationDataset(cfg.dataset.root, split, unseen=config_unseen_names(cfg), mode="inductive")
    id_bytes = max(1, max((len(i.encode()) for i in data.ids), default=1))
    visual = meta_vision_tower(cfg) if visual is None else visual
    row = cache_row_for(cfg, encoder_shape(visual), data.num_classes, id_bytes)
    rows = len(shard_range(len(data.ids), *shard)) * int(cfg.cache.views_per_image)
    return row.shard_bytes(rows), rows


def check_cache_space(
    cfg: Config, split: str, shard: tuple[int, int], out: str | Path, *, overwrite: bool = False
) -> int | None:
    """Refuse to start a cache shard that the file system of `out` cannot hold.

    Returns the bytes the shard needs (None when there is nothing to check: a config or
    split the writer refuses anyway, or an existing `out` it will not rewrite). A partial
    file of an earlier attempt is allocated in full, so its bytes count as available.
    Raises NotEnoughSpaceError in one line; nothing is written either way.
    """
    from cascade_clip.cache import partial_path

    out = Path(out)
    if cfg.model.encoder_mode != "frozen" or split != cfg.dataset.train_split:
        return None  # write_shard says why not
    if out.exists() and not overwrite:
        return None  # complete (a no-op) or refused by write_shard
    data, rows = shard_data_bytes(cfg, split, shard)
    needed = data + shard_allowance(rows)
    partial = partial_path(out)
    held = partial.stat().st_size if partial.is_file() else 0
    folder = existing_ancestor(out.parent)
    free = shutil.disk_usage(folder).free
    if free + held >= needed:
        return needed
    views = int(cfg.cache.views_per_image)
    shrink = [f"lower cache.views_per_image (now {views})"] if views > 1 else []
    shrink += ["train with model.encoder_mode: vpt (no cache)",
               f"cache fewer images (a shorter dataset.train_split list than {split!r})"]
    have = f"{fmt_bytes(free)} free" + (f" + {fmt_bytes(held)} in {partial.name}" if held else "")
    raise NotEnoughSpaceError(
        f"{folder}: cache shard {shard[0]}/{shard[1]} needs {fmt_bytes(needed)} ({needed:,} bytes: "
        f"{rows:,} rows), the file system has {have}; to shrink it, " + ", or ".join(shrink)
        + "; or free space (--no-space-check skips this check)"
    )


# --- measured times (benchmarks/NOTES.md) --------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """A rate measured for one setup. `requires`: facts (see `run_facts`) that must match."""

    stage: str  # train | evaluate | cache
    rate: float  # per second, of `unit`
    unit: str  # "it" (training iterations) | "images" | "rows"
    requires: dict[str, Any]
    source: str
    caveat: str = ""


VIT_B16 = "ViT 12 blocks x 768, patch 16, embed 512"
PAPER_HEAD = "3 layers, 8 heads, FFN 2048"
H100_TRAIN = "NOTES.md Training, H100"
H100_CAVEAT = ("one process, Triton kernels, random ViT-B/16-shaped encoder, 156 queries, loading with "
               "num_workers 0; multi-GPU scaling not measured")
MEASURED: tuple[Measured, ...] = (
    Measured("train", 2.59, "it", {"device": "gpu", "encoder": VIT_B16, "input": 512, "taps": 7,
                                    "head": PAPER_HEAD, "batch": 4, "amp": True, "path": "vpt"},
             H100_TRAIN, H100_CAVEAT),
    Measured("train", 5.82, "it", {"device": "gpu", "encoder": VIT_B16, "input": 512, "taps": 7,
                                    "head": PAPER_HEAD, "batch": 4, "amp": True, "path": "cache"},
             H100_TRAIN, H100_CAVEAT),
    Measured("evaluate", 2.3, "images", {"device": "gpu", "encoder": VIT_B16, "input": 512, "amp": True},
             H100_TRAIN, "sliding window, one process, measured on 2 images only"),
    Measured("cache", 0.15, "rows", {"device": "cpu", "encoder": VIT_B16, "input": 512, "taps": 7},
             "NOTES.md Feature cache, Throughput", "write_shard end to end on the 2-core development VM"),
)
# What each fact is in the config, for the "not measured" message.
FACT_KEYS = {"device": "GPUs (workflow.*_gpus)", "encoder": "encoder", "input": "input size",
             "taps": "tapped blocks", "head": "model.decoder", "batch": "batch per process",
             "amp": "train.amp", "path": "model.encoder_mode"}
FACT_VALUES = {("device", "gpu"): "> 0", ("device", "cpu"): "0", ("path", "cache"): "frozen",
               ("amp", True): "true", ("amp", False): "false"}

# The shapes demo as committed, measured end to end (benchmarks/NOTES.md, Shapes world, "Fifth
# session": `snakemake --cores all` in two fresh clones on the quiet 2-core VM).
DEMO_MEASURED_KEYS: dict[str, Any] = {
    "dataset.name": "shapes", "shapes": SHAPES_MEASURED, "pretrain.steps": 260, "pretrain.max_seconds": 0,
    "pretrain": SHAPES_CLIP_MEASURED, "clip.image_size": 128, "model.stages": [[3, 4], [5], [6]],
    "model.encoder_mode": "frozen", "model.decoder.layers": 2, "model.decoder.heads": 4,
    "model.decoder.ffn_dim": 512, "train.iters": 1000, "train.batch_size": 16, "train.loss_stride": 4,
    "self_train.iters": 250, "cache.views_per_image": 1, "evaluate.short_side": 128,
    "ablations": {"cascade": {}, "single_decoder": {"model.stages": [[6]]}}, "workflow.self_train": True,
}
DEMO_MEASURED = {
    "source": "benchmarks/NOTES.md, Shapes world, Fifth session: two fresh clones, --cores all, 2-core VM",
    "whole": (418, 480),
    "rules": [("make-shapes", "18-19 s"), ("pretrain-clip", "188-201 s"), ("text embeddings", "7-8 s"),
              ("cache", "31-36 s"), ("train cascade", "112-143 s"), ("train single_decoder", "56-72 s"),
              ("self-training", "38-46 s"), ("each evaluation", "17-23 s")],
}


def run_facts(cfg: Config, shape: EncoderShape, stage: str, wf: dict[str, Any]) -> dict[str, Any]:
    """The facts of one stage of one run that a measured rate must match."""
    from cascade_clip.cache import tapped_blocks

    gpus = {"train": wf["train_gpus"], "evaluate": wf["eval_gpus"], "cache": wf["cache_gpus"]}[stage]
    dec = cfg.model.decoder
    batch = cfg.train.batch_size
    if cfg.train.setting == "transductive" and cfg.self_train.batch_size:
        batch = cfg.self_train.batch_size
    return {
        "device": "gpu" if gpus else "cpu",
        "encoder": shape.describe(),
        "input": cfg.train.augment.crop_size if stage != "evaluate" else cfg.evaluate.crop_size,
        "taps": len(tapped_blocks(cfg)),
        "head": f"{dec.layers} layers, {dec.heads} heads, FFN {dec.ffn_dim}",
        "batch": batch,
        "amp": cfg.train.amp,
        "path": "cache" if cfg.model.encoder_mode == "frozen" else "vpt",
    }


def match_measured(stage: str, facts: dict[str, Any]) -> tuple[Measured | None, str]:
    """The measurement for these facts, or (None, why not: the nearest one's first mismatch)."""
    why, best = "no measurement of this stage", -1
    for m in MEASURED:
        if m.stage != stage:
            continue
        wrong = [k for k, v in m.requires.items() if facts.get(k) != v]
        if not wrong:
            return m, ""
        score = len(m.requires) - len(wrong)
        if score > best:
            k, best = wrong[0], score
            want, have = (FACT_VALUES.get((k, v), v) for v in (m.requires[k], facts.get(k)))
            why = f"{m.rate} {m.unit}/s ({m.source}) had {FACT_KEYS[k]} {want}, this run {have}"
    return None, why


def shapes_mismatch(raw: dict[str, Any]) -> str | None:
    """None when the `shapes` section is the measured world's (SHAPES_MEASURED, any seed)."""
    section = {k: v for k, v in (raw.get("shapes") or {}).items() if k != "seed"}
    for key in sorted(set(section) | set(SHAPES_MEASURED)):
        if key not in section:
            return f"shapes.{key} is not set, measured with {SHAPES_MEASURED[key]!r}"
        if key not in SHAPES_MEASURED:
            return f"shapes.{key} is {section[key]!r}, measured without it"
        if section[key] != SHAPES_MEASURED[key]:
            return f"shapes.{key} is {section[key]!r}, measured with {SHAPES_MEASURED[key]!r}"
    return None


def pretrain_mismatch(raw: dict[str, Any]) -> str | None:
    """None when the small CLIP's architecture (`pretrain`, defaults filled) is the measured one."""
    from cascade_clip.pretrain import PretrainConfig

    effective = PretrainConfig.from_dict(raw.get("pretrain"))
    for key, want in SHAPES_CLIP_MEASURED.items():
        if getattr(effective, key) != want:
            return f"pretrain.{key} is {getattr(effective, key)!r}, measured with {want!r}"
    return None


def demo_mismatch(cfg: Config, raw: dict[str, Any]) -> str | None:
    """None when the config is the measured shapes demo, else the first key that differs."""
    for key, want in DEMO_MEASURED_KEYS.items():
        if key in ("shapes", "pretrain"):
            miss = shapes_mismatch(raw) if key == "shapes" else pretrain_mismatch(raw)
            if miss is not None:
                return miss
            continue
        if key == "ablations":
            have = raw.get("ablations")
        elif key == "workflow.self_train":
            have = workflow_settings(cfg)["self_train"]
        elif key.startswith("pretrain."):
            from cascade_clip.pretrain import PretrainConfig

            have = getattr(PretrainConfig.from_dict(raw.get("pretrain")), key.split(".", 1)[1])
        else:
            have = _dotted(dataclasses.asdict(cfg), key)
        if have != want:
            return f"{key} is {have!r}, measured with {want!r}"
    return None


# --- the plan ---------------------------------------------------------------------------------


@dataclass
class Download:
    dataset: str
    name: str
    size: Size
    extracted: Size | None  # None: used as is


@dataclass
class CachePlan:
    row: CacheRow
    images: int | None
    views: int
    shards: int
    index_row: int
    used_by: list[str]
    images_source: str

    @property
    def rows(self) -> int | None:
        return None if self.images is None else self.images * self.views

    def shard_rows(self) -> list[int]:
        from cascade_clip.cache import shard_range

        return [len(shard_range(self.images, i, self.shards)) * self.views for i in range(self.shards)]

    @property
    def data_bytes(self) -> int | None:
        """Raw bytes of all shards (the HDF5 bookkeeping adds well under 0.1%)."""
        return None if self.images is None else sum(map(self.row.shard_bytes, self.shard_rows()))

    @property
    def largest_shard_bytes(self) -> int | None:
        return None if self.images is None else max(map(self.row.shard_bytes, self.shard_rows()))


@dataclass
class Plan:
    config: str
    cfg: Config
    raw: dict[str, Any]
    workflow: dict[str, Any]
    shape: EncoderShape
    datasets: dict[str, str]  # name -> root
    downloads: list[Download] = field(default_factory=list)
    cache: CachePlan | None = None
    checkpoints: dict[str, CheckpointSizes] = field(default_factory=dict)
    run_cfgs: dict[str, Config] = field(default_factory=dict)


def _raw_config(path: str | Path, overrides: dict[str, Any] | None) -> dict[str, Any]:
    from cascade_clip.config import config_to_dict

    return config_to_dict(load_config(path, overrides))


def make_plan(path: str | Path, overrides: dict[str, Any] | None = None) -> Plan:
    """Everything `format_plan` prints, computed without data, weights or network."""
    from cascade_clip.download import load_sources

    cfg = load_config(path, overrides)
    raw = _raw_config(path, overrides)
    wf = workflow_settings(cfg)
    run_cfgs = run_configs(path, overrides)
    datasets = {cfg.dataset.name: cfg.dataset.root}
    for target in cfg.extra.get("cross_eval") or []:
        datasets.setdefault(target["dataset"], target["root"])
    visual = meta_vision_tower(cfg)
    plan = Plan(str(path), cfg, raw, wf, encoder_shape(visual), datasets, run_cfgs=run_cfgs)

    sources = load_sources()
    for name in datasets:
        for entry in sources.get(name, []):
            size = Size(entry.get("size"), bool(entry.get("size_approximate")))
            extracted = None
            if entry.get("extract_to") is not None:
                packed = entry["name"].endswith((".tgz", ".tar.gz", ".tar.bz2", ".tar.xz"))
                extracted = Size(None) if packed else Size(size.bytes, True)
            plan.downloads.append(Download(name, entry["name"], size, extracted))

    for run, rcfg in run_cfgs.items():
        plan.checkpoints[run], _ = checkpoint_sizes(rcfg, visual)

    frozen = [run for run, rcfg in run_cfgs.items() if rcfg.model.encoder_mode == "frozen"]
    if frozen:
        facts = split_facts(cfg, cfg.dataset.name, cfg.dataset.root, cfg.dataset.train_split)
        classes = num_classes(cfg.dataset.name, cfg.dataset.root)
        id_bytes = facts.id_bytes or 16
        plan.cache = CachePlan(
            row=cache_row_for(cfg, plan.shape, classes, id_bytes), images=facts.images,
            views=int(cfg.cache.views_per_image), shards=int(wf["cache_shards"]),
            index_row=index_row_bytes(classes, id_bytes), used_by=frozen, images_source=facts.source,
        )
    return plan


def _free(folder: str | Path) -> str:
    where = existing_ancestor(folder)
    return f"{fmt_bytes(shutil.disk_usage(where).free)} free on the file system of {where}"


def format_plan(plan: Plan) -> str:
    cfg, wf = plan.cfg, plan.workflow
    results = cfg.out_dir
    downloads_dir = wf["downloads_dir"]
    lines = [
        f"Plan for experiment {cfg.experiment!r} ({plan.config}): before anything runs.",
        "Sizes in decimal units (1 GB = 10^9 bytes); '~' approximate, '?' unknown.",
        "",
    ]
    disk: list[tuple[str, Size, str]] = []  # (what, size, folder it lands in)
    unknown: list[str] = []

    # downloads, extraction, conversion
    lines.append(f"Downloads (into {downloads_dir}/<dataset>/, kept after extraction; "
                 f"{_free(downloads_dir)})")
    if not plan.downloads:
        lines.append("  none: " + ("shapes is generated locally" if cfg.dataset.name == "shapes"
                                   else f"no download sources for {', '.join(plan.datasets)}"))
    for d in plan.downloads:
        lines.append(f"  {d.dataset:<18} {d.name:<34} {d.size}")
        if d.size.bytes is None:
            unknown.append(f"download {d.name}")
    if plan.downloads:
        dl_total = total([d.size for d in plan.downloads])
        lines.append(f"  {'total':<53} {dl_total}" + (" + ?" if any(d.size.bytes is None for d in
                                                                     plan.downloads) else ""))
        disk.append(("downloads", dl_total, downloads_dir))
        extracted = [d.extracted for d in plan.downloads if d.extracted is not None]
        ex_total = total(extracted)
        lines.append("")
        lines.append("Extracted archives (beside them): about the archives' size for zip and tar "
                     "(JPEG/PNG members, uncompressed tar), unknown for .tgz")
        for d in plan.downloads:
            if d.extracted is None:
                continue
            lines.append(f"  {d.dataset:<18} {d.name:<34} {d.extracted}")
            if d.extracted.bytes is None:
                unknown.append(f"extracted {d.name}")
        lines.append(f"  {'total':<53} {ex_total}")
        disk.append(("extracted archives", ex_total, downloads_dir))

    lines.append("")
    lines.append("Converted data (prepare / make-shapes)")
    for name, root in plan.datasets.items():
        lines.extend(_converted_lines(plan, name, root, downloads_dir, disk, unknown))

    # feature cache
    lines.append("")
    lines.extend(_cache_lines(plan, results, disk, unknown))

    # checkpoints
    lines.append("")
    lines.append(f"Checkpoints (fp32, in {results}/runs/<run>/; per run ckpt_half.pt, model_final.pt "
                 "and ckpt_last.pt with AdamW's moments)")
    ck_total = 0
    for run, ck in plan.checkpoints.items():
        rcfg = plan.run_cfgs[run]
        lines.append(
            f"  {run:<18} {ck.trainable_params:>12,} trainable parameters ({rcfg.model.encoder_mode}), "
            f"{ck.state_values:,} values stored: {fmt_bytes(ck.model_bytes)} each, "
            f"ckpt_last {fmt_bytes(ck.last_bytes)}; run {fmt_bytes(ck.run_bytes)}"
        )
        ck_total += ck.run_bytes
    lines.append(f"  {'total':<18} {fmt_bytes(ck_total)} (each file a few kB more: config, classes, "
                 "generator states)")
    disk.append(("checkpoints", Size(ck_total), str(results)))

    # disk total
    lines.append("")
    grand = total([s for _, s, _ in disk])
    parts = ", ".join(f"{what} {s}" for what, s, _ in disk)
    lines.append(f"Disk in all: {grand}" + (f" + unknown ({', '.join(unknown)})" if unknown else ""))
    lines.append(f"  = {parts}")
    lines.extend(_space_lines(disk))

    # time
    lines.append("")
    lines.extend(_time_lines(plan))
    return "\n".join(lines)


def _space_lines(disk: list[tuple[str, Size, str]]) -> list[str]:
    """Per file system: the known bytes that land there against its free space."""
    by_fs: dict[int, tuple[Path, list[tuple[str, Size]]]] = {}
    for what, size, folder in disk:
        where = existing_ancestor(folder)
        by_fs.setdefault(where.stat().st_dev, (where, []))[1].append((what, size))
    lines = []
    for where, items in by_fs.values():
        need, free = total([s for _, s in items]), shutil.disk_usage(where).free
        short = (need.bytes or 0) - free
        verdict = "fits" if short <= 0 else f"SHORT by {fmt_bytes(short, need.approx)}"
        lines.append(f"  on the file system of {where}: {need} ({', '.join(w for w, _ in items)}), "
                     f"{fmt_bytes(free)} free: {verdict}")
    return lines


def _converted_lines(plan: Plan, name: str, root: str, downloads_dir: str,
                     disk: list[tuple[str, Size, str]], unknown: list[str]) -> list[str]:
    out = []
    if (Path(root) / "dataset.json").is_file():
        return [f"  {name:<18} {root}: already prepared"]
    if name == "shapes":
        miss = shapes_mismatch(plan.raw)
        if miss is None:
            size = Size(SHAPES_WORLD_BYTES)
            out.append(f"  {name:<18} {root}: {size} (measured, make-shapes with these settings)")
            disk.append(("generated world", size, root))
        else:
            out.append(f"  {name:<18} {root}: not measured ({miss})")
            unknown.append("generated world")
        clip_path = plan.cfg.clip.pretrained
        if "pretrain" in plan.cfg.extra and not Path(str(clip_path)).is_file():
            miss = pretrain_mismatch(plan.raw)
            if miss is None:
                size = Size(SHAPES_CLIP_BYTES)
                out.append(f"  {'small CLIP':<18} {clip_path}: {size} (measured, pretrain-clip)")
                disk.append(("small CLIP", size, str(Path(str(clip_path)).parent)))
            else:
                out.append(f"  {'small CLIP':<18} {clip_path}: not measured ({miss})")
                unknown.append("small CLIP")
        return out
    linked = same_file_system(root, downloads_dir)
    images = ("images: hard links, no extra bytes" if linked
              else "images: copied (another file system), about the image archives again")
    label_archive = LABEL_ARCHIVES.get(name)
    sizes = {d.name: d.size for d in plan.downloads}
    if label_archive and label_archive in sizes:
        labels = Size(sizes[label_archive].bytes, True)
        out.append(f"  {name:<18} {root}: labels {labels} (the source maps re-indexed); {images}")
        disk.append((f"{name} labels", labels, root))
    else:
        out.append(f"  {name:<18} {root}: labels ? (one PNG per image, size not known); {images}")
        unknown.append(f"{name} labels")
    if not linked:
        image_bytes = total([d.size for d in plan.downloads if d.dataset == name
                             and d.name != label_archive and d.extracted is not None])
        disk.append((f"{name} image copies", Size(image_bytes.bytes, True), root))
    return out


def _cache_lines(plan: Plan, results: Path, disk: list[tuple[str, Size, str]],
                 unknown: list[str]) -> list[str]:
    cache = plan.cache
    folder = results / "cache" / "train"
    if cache is None:
        modes = sorted({rcfg.model.encoder_mode for rcfg in plan.run_cfgs.values()})
        return [f"Feature cache: none (no run trains from it: model.encoder_mode {', '.join(modes)})"]
    cfg, row = plan.cfg, cache.row
    side = math.isqrt(row.num_tokens)
    lines = [
        f"Feature cache (read by run(s) {', '.join(cache.used_by)}; in {folder}/; {_free(folder)})",
        f"  per image-view: {row.total:,} bytes ({fmt_bytes(row.total)}) = {row.num_taps} taps x "
        f"{side}x{side} tokens x {row.embed_dim} channels fp16 ({row.taps:,}) + global token "
        f"({row.global_token:,}) + labels/view metadata ({row.metadata:,})",
    ]
    if cache.images is None:
        lines.append(f"  images: ? (dataset.train_split {cfg.dataset.train_split!r} is not known "
                     "before prepare): total ?")
        unknown.append("feature cache")
        return lines
    how = cache.images_source
    data = cache.data_bytes
    index = cache.rows * cache.index_row
    lines.append(f"  {cache.images:,} training images ({how}) x {cache.views} view(s) = {cache.rows:,} rows: "
                 f"{data:,} bytes ({fmt_bytes(data)}) uncompressed")
    largest = cache.largest_shard_bytes
    lines.append(f"  in {cache.shards} shard(s) of at most {fmt_bytes(largest)}, "
                 f"plus the joined index {fmt_bytes(index)}"
                 + (f" (cache.compression {cfg.cache.compression}: NOTES.md measured 0-8% saved)"
                    if cfg.cache.compression else ""))
    disk.append(("feature cache", Size(data + index), str(folder)))
    return lines


def _time_lines(plan: Plan) -> list[str]:
    cfg, wf = plan.cfg, plan.workflow
    lines = ["Time (only where benchmarks/NOTES.md holds a measured figure for this setup)"]
    if cfg.dataset.name == "shapes":
        miss = demo_mismatch(cfg, plan.raw)
        if miss is None:
            lo, hi = DEMO_MEASURED["whole"]
            lines.append(f"  whole workflow: {lo}-{hi} s ({DEMO_MEASURED['source']})")
            lines.append("  per rule: " + ", ".join(f"{r} {t}" for r, t in DEMO_MEASURED["rules"]))
            return lines
        lines.append(f"  whole workflow: not measured ({miss})")
    else:
        lines.append("  download, prepare: not measured (network and disk bound)")
    if plan.cache is not None:
        m, why = match_measured("cache", run_facts(cfg, plan.shape, "cache", wf))
        if m is not None and plan.cache.rows is not None:
            secs = plan.cache.rows / m.rate
            lines.append(f"  cache: ~{fmt_duration(secs)} for {plan.cache.rows:,} rows at {m.rate} rows/s "
                         f"({m.source}: {m.caveat})")
        else:
            lines.append(f"  cache: not measured: {why}")
    for run, rcfg in plan.run_cfgs.items():
        iters = rcfg.self_train.iters if rcfg.train.setting == "transductive" else rcfg.train.iters
        m, why = match_measured("train", run_facts(rcfg, plan.shape, "train", wf))
        if m is None:
            lines.append(f"  train {run} ({iters:,} it): not measured: {why}")
        else:
            lines.append(f"  train {run} ({iters:,} it): ~{fmt_duration(iters / m.rate)} at {m.rate} it/s "
                         f"({m.source}: {m.caveat})")
    m, why = match_measured("evaluate", run_facts(cfg, plan.shape, "evaluate", wf))
    val = split_facts(cfg, cfg.dataset.name, cfg.dataset.root, cfg.dataset.val_split).images
    if m is not None and val:
        lines.append(f"  evaluate ({val:,} images a run): ~{fmt_duration(val / m.rate)} at {m.rate} "
                     f"images/s ({m.source}: {m.caveat})")
    else:
        lines.append(f"  evaluate: not measured: {why}")
    return lines
