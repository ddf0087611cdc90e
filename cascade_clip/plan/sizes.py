"""Sizes of what a workflow writes, computed without weights or data: the runs of a config,
the model's parameter counts (vision tower on the meta device), split sizes, the feature
cache's bytes per row and per shard, and the cache writer's free-space check."""

import inspect
import json
import math
import shutil
import types
from dataclasses import dataclass
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
    "voc21": {"train": 10_582, "val": 1_449},
    "ade20k_150": {"train": 20_210, "val": 2_000},
}
KNOWN_ID_BYTES = {"coco_stuff_164k": 12, "voc12": 11, "pascal_context_59": 11, "shapes": 12, "voc21": 11,
                  "ade20k_150": 18}
# Label archives whose maps `prepare` re-indexes one to one (converted labels ~ the same size).
LABEL_ARCHIVES = {"coco_stuff_164k": "stuffthingmaps_trainval2017.zip"}

# HDF5 bookkeeping of a shard beyond its datasets' raw bytes (superblock, object headers,
# attributes, chunk index): ~17 kB plus ~65 B per row on tiny shards of 10-2000 rows
# (tests/test_plan.py checks the allowance holds); the space check adds this allowance.
SHARD_OVERHEAD_FIXED = 1 << 20
SHARD_OVERHEAD_PER_ROW = 256


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


def dotted(data: dict[str, Any], key: str, default: Any = None) -> Any:
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
    from cascade_clip.paper import row_overrides

    runs = {name: row_overrides(ov) for name, ov in ablations.items()}
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
    release_params: int = 0  # trainable parameters as the paper counts them (model.head.release_parameters)

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
    from cascade_clip.model.head import release_parameters

    visual = meta_vision_tower(cfg) if visual is None else visual
    shape = encoder_shape(visual)
    import torch

    with torch.device("meta"):  # counts and sizes only: no memory, no initialisation
        model = CascadeCLIP(types.SimpleNamespace(visual=visual), cfg.model)
    state = model.trainable_state_dict()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in params)
    return CheckpointSizes(
        state_values=sum(t.numel() for t in state.values()),
        model_bytes=sum(t.numel() * t.element_size() for t in state.values()),
        trainable_params=sum(p.numel() for p in params),
        trainable_tensors=len(params),
        optimizer_bytes=2 * trainable_bytes + 4 * len(params),
        release_params=release_parameters(model),
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


def num_classes(name: str, root: str, source: dict | None = None) -> int:
    from cascade_clip.data.registry import get_spec, load_classes

    if (Path(root) / "dataset.json").is_file():
        return len(load_classes(root))
    if source and source.get("classes"):  # your own folder dataset, not yet prepared
        from cascade_clip.data.own import read_class_names

        return len(read_class_names(source["classes"]))
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
    encoding: str = "fp16"  # cache.encoding: how /taps stores a value

    @property
    def taps(self) -> int:
        """/taps: L x N x C values of `encoding` (fp16: 2 bytes, int8: 1)."""
        from cascade_clip.cache.encoding import bytes_per_value

        return self.num_taps * self.num_tokens * self.embed_dim * bytes_per_value(self.encoding)

    @property
    def global_token(self) -> int:
        """/global_token: C fp16."""
        return self.embed_dim * np.dtype(np.float16).itemsize

    @property
    def metadata(self) -> int:
        """/image_index int64, /view_index int16, /ids S<n>, /view S512, /present uint8 x K, /done uint8,
        /checksum uint32."""
        from cascade_clip.cache import VIEW_BYTES

        u8 = np.dtype(np.uint8).itemsize
        return (np.dtype(np.int64).itemsize + np.dtype(np.int16).itemsize + self.id_bytes + VIEW_BYTES
                + self.classes * u8 + u8 + np.dtype(np.uint32).itemsize)

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
    return CacheRow(len(tapped_blocks(cfg)), side * side, shape.embed_dim, classes, id_bytes,
                    cfg.cache.encoding)


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
    shrink += ["store it as cache.encoding: int8 (half of fp16)"] if cfg.cache.encoding == "fp16" else []
    shrink += [f"cache fewer images (a shorter dataset.train_split list than {split!r})"]
    have = f"{fmt_bytes(free)} free" + (f" + {fmt_bytes(held)} in {partial.name}" if held else "")
    raise NotEnoughSpaceError(
        f"{folder}: cache shard {shard[0]}/{shard[1]} needs {fmt_bytes(needed)} ({needed:,} bytes: "
        f"{rows:,} rows), the file system has {have}; set cache.enabled: false to train the frozen "
        "row(s) online from the images without a cache; or, to shrink it, " + ", or ".join(shrink)
        + "; or free space (--no-space-check skips this check)"
    )




# --- time limits of the cache jobs (workflow/rules/cache.smk) -----------------------------------

# A shard's job encodes its rows, writes them and reads every row back to verify it; the join
# reads the shards' per-row metadata and checks a sample of rows. Seconds a shard job may
# take per row, with a wide margin: CPU (no cache GPU): NOTES.md measured 0.15 rows/s for
# ViT-B/16 at 512 px on 2 cores (6.7 s a row), 10 s allowed; GPU: not measured: decoding and
# augmenting took ~66 ms a row in one loader process on the H100's host (NOTES.md), the
# encoder ~2.6 ms, plus writing and reading back 3.7-7.3 MB a row: 0.25 s allowed.
CACHE_SECONDS_PER_ROW = {"gpu": 0.25, "cpu": 10.0}
CACHE_JOB_BASE_MIN = 15  # start-up, the CLIP loaded, the index written
JOIN_ROWS_PER_MIN = 10_000  # per-row metadata read and checked (ids, views, class presence)
UNKNOWN_SHARD_MIN = 12 * 60  # the split's size is not known before the dataset is prepared


def cache_job_minutes(cfg: Config, shards: int, gpus: int) -> tuple[int, int]:
    """SLURM time limits (minutes) of one cache shard job and of the join, from the number of
    rows they handle (the prepared split list, else the dataset's published size)."""
    facts = split_facts(cfg, cfg.dataset.name, cfg.dataset.root, cfg.dataset.train_split)
    if facts.images is None:
        return UNKNOWN_SHARD_MIN, CACHE_JOB_BASE_MIN + UNKNOWN_SHARD_MIN // 12
    views = int(cfg.cache.views_per_image)
    shard_rows = -(-facts.images // max(1, shards)) * views
    per_row = CACHE_SECONDS_PER_ROW["gpu" if gpus else "cpu"]
    shard = CACHE_JOB_BASE_MIN + math.ceil(shard_rows * per_row / 60)
    join = CACHE_JOB_BASE_MIN + math.ceil(facts.images * views / JOIN_ROWS_PER_MIN)
    return shard, join
