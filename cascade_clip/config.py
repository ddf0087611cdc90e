"""Experiment configuration: one YAML file per experiment, one dataclass per section.

The YAML layout (see config/config.yaml) mirrors these dataclasses section by section.
One validator decides what a valid config is: the JSON schema `config.schema.yaml` beside
this file (also `workflow/schemas/config.schema.yaml`, a link to it) with its types,
ranges and choices, then the cross-field checks of `_check`. Every CLI stage applies both
after `--set` overrides, and the Snakefile applies both to the workflow's config, so the
two accept exactly the same configs.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cascade_clip.errors import InputError


class ConfigError(InputError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class ClipConfig:
    """Which CLIP to load and how.

    `pretrained` names the weights: an open_clip tag ("openai"), a path to a weights file,
    or "random" for a seeded random CLIP (tests, smoke runs; never implied by a missing
    value). `model_config` is a path to an open_clip model-config JSON (or an inline
    dict) for models open_clip does not ship, such as the shapes world's small CLIP or
    the tiny test models.
    """

    model: str = "ViT-B-16-quickgelu"
    pretrained: str | None = "openai"
    model_config: str | dict | None = None
    image_size: int = 512
    # How the 14x14 positional grid is resized to the input's grid: "bilinear" as the
    # authors' release (align_corners false), or "bicubic" (this project's earlier choice).
    pos_resize: Literal["bilinear", "bicubic"] = "bilinear"
    # Prompt template set by name (cascade_clip.model.text.TEMPLATE_SETS); "dataset" takes
    # the dataset's own set from the registry, as the release does: the 15 scene templates
    # for COCO-Stuff and Context, the single "a photo of a {}" for VOC, also as a
    # cross-dataset target. A list of templates ("a satellite photo of a {}.") is a set of
    # the config's own (your own dataset's prompts).
    templates: str | list[str] = "dataset"
    # Class names go into the templates "raw" (as the release: "wall-concrete") or
    # "readable" ("wall concrete", "-other" dropped; this project's earlier choice).
    prompt_names: Literal["raw", "readable"] = "raw"


@dataclass
class DecoderConfig:
    layers: int = 3
    heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    # A trainable Linear + LayerNorm on each stage's pixel tokens before its layers. Not in
    # the authors' decoder (it takes the NGA-fused, L2-normalised tokens as they are); this
    # project's variant, off in the real configs.
    input_adapter: bool = False


@dataclass
class ModelConfig:
    """The Cascade-CLIP head and how it taps the encoder (docs/design.md: The model)."""

    stages: list[list[int]] = field(default_factory=lambda: [[6, 7, 8], [9, 10, 11], [12]])
    tap_projection: Literal["random", "clip"] = "random"
    tap_seed: int = 0
    fusion: Literal["nga", "sum", "concat", "attention"] = "nga"
    nga_sigma: float = 1.0
    nga_learnable: bool = True
    # fusion "sum" only: learnable per-block weights initialised to 1 (the paper's Table 8
    # "sum†"); false: a plain sum, as "cascade, no NGA" (Table 4)
    sum_learnable: bool = False
    query_projection: Literal["independent", "shared"] = "independent"
    relationship_descriptor: bool = True
    cascade: bool = True  # False: one decoder over all taps fused ("multi-layer fusion")
    # Independent decoders (each with its own query projection) per stage, maps summed; 1 in
    # the paper's model. 3 gives Table 7's last-layer and multi-layer-fusion models the
    # cascade's parameter count.
    decoders_per_stage: int = 1
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    encoder_mode: Literal["frozen", "vpt"] = "frozen"
    vpt_tokens: int = 50
    # vpt only: the release's trainable LayerNorm (eps 1e-6) on every tapped hidden state
    # and on the last block's output, trained with the prompts.
    vpt_prompt_norm: bool = True
    # CLS token input: "official" = 2 x class_embedding + pos[0] (a quirk of the release
    # that its numbers carry), "standard" = CLIP's own class_embedding + pos[0].
    cls_token: Literal["official", "standard"] = "official"
    seen_calibration: float = 0.1


@dataclass
class DatasetConfig:
    name: str = "shapes"
    root: str = "resources/data/shapes"
    # Unseen class names; None: the registry's split (the paper's); a string names another
    # split of the registry, e.g. "official-release" for Context (see data.registry).
    unseen: list[str] | str | None = None
    # Your own data ({format: folder | coco, images, masks, classes, splits, annotations,
    # val_fraction}), converted by `cascade-clip prepare` to `root`; None: a registry dataset.
    source: dict[str, Any] | None = None
    train_split: str = "train"
    val_split: str = "val"
    drop_unseen_images: bool = False


@dataclass
class AugmentConfig:
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: int = 512
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True


@dataclass
class TrainConfig:
    setting: Literal["inductive", "transductive", "fully_supervised"] = "inductive"
    seed: int | None = None  # training randomness; None: the experiment seed (workflow.seeds sets it)
    iters: int = 80000  # optimizer steps
    # Images one process holds in one forward/backward pass. With `global_batch` a process may
    # hold fewer (the global batch over more processes) or accumulate several such passes per
    # step (fewer processes): `batch_plan`.
    batch_size: int = 4
    # Images per optimizer step over all processes; None: batch_size x processes (no
    # accumulation). The real configs declare the release's 16 (4 GPUs x 4), which then holds
    # on 1, 2, 4 or 8 GPUs through gradient accumulation.
    global_batch: int | None = None
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    poly_power: float = 0.9
    min_lr: float = 1e-6
    ignore_as_negative: bool = True
    # Loss on every n-th label pixel per axis (centre-sampled); 1 = full resolution, as the
    # paper. The logits are 1/patch of the labels' size (1/16 for ViT-B/16, 1/8 in the demo),
    # so a stride under the patch size changes little; the loss costs 1/n^2.
    loss_stride: int = 1
    log_interval: int = 50
    checkpoint_interval: int = 2000
    # DataLoader workers per process; "auto": the process's share of the job's cores less
    # one, at most 4 (cascade_clip.distributed.loader_workers)
    num_workers: int | str = "auto"
    prefetch_factor: int = 4  # batches each worker keeps ready
    amp: bool = True  # bf16 autocast on GPU
    # torch.compile the training step: "none", "default", or "reduce-overhead" (CUDA graphs
    # on a GPU: the head step's launch overhead gone); falls back to eager if it fails
    compile: Literal["none", "default", "reduce-overhead"] = "none"
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class SelfTrainConfig:
    iters: int = 40000
    start_fraction: float = 0.5  # start from the inductive checkpoint at half its schedule
    batch_size: int | None = None  # per process; None = train.batch_size (VOC: 8, as released)
    global_batch: int | None = None  # None = train.global_batch (VOC: 32 = 4 x 8, as released)


@dataclass
class EvalConfig:
    # The split evaluation reports; None: dataset.val_split. The shapes demo reports its
    # held-out `test` split and tunes on `val`.
    split: str | None = None
    crop_size: int = 512
    stride: int = 426
    short_side: int = 512
    num_visualize: int = 8
    # VOC-21's background as a peer prompts it (cascade_clip/data/classes/voc21_background.yaml):
    # "catseg" (max over 39 Context names, the protocol of the most cited table), "fcclip"
    # (max over FC-CLIP's stuff synonyms) or "word" ("background").
    voc21_background: Literal["catseg", "fcclip", "word"] = "catseg"


@dataclass
class CacheConfig:
    views_per_image: int = 1
    compression: str | None = None
    batch_size: int = 8
    # false: frozen runs train online from images with the usual augmentation (no cache on disk)
    enabled: bool = True
    # how tapped tokens are stored: fp16, or int8 (half the bytes; cascade_clip.cache.encoding)
    encoding: str = "int8"


@dataclass
class Config:
    experiment: str = "shapes"
    seed: int = 0
    results_dir: str = "results"
    clip: ClipConfig = field(default_factory=ClipConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    self_train: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # Sections owned by other stages (download sources, the shapes generator, the small
    # CLIP recipe, the workflow's ablations) are kept as plain dicts here.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return Path(self.results_dir) / self.experiment


# Top-level keys that belong to other consumers (Snakemake rules, generators, downloads)
# and that the dataclasses keep verbatim in Config.extra.
EXTRA_SECTIONS = ("shapes", "pretrain", "ablations", "workflow", "cross_eval", "sources")

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
_NUMBER_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@functools.cache
def config_schema() -> dict[str, Any]:
    """The JSON schema of an experiment config (types, ranges, choices)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def validate_config_dict(data: Any, source: str = "config") -> None:
    """Check a parsed config against the JSON schema; the most relevant violation becomes
    one ConfigError naming the key."""
    import jsonschema
    from jsonschema.exceptions import best_match

    validator = jsonschema.Draft202012Validator(config_schema())
    error = best_match(validator.iter_errors(data))
    if error is None:
        return
    where = ".".join(str(p) for p in error.absolute_path) or "top level"
    hint = ""
    if isinstance(error.instance, str) and _NUMBER_TEXT.match(error.instance):
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)"
    raise ConfigError(f"{source}: {where}: {error.message}{hint}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return data
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = (
            fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        )  # noqa: E501
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        elif isinstance(value, list) and name in ("scale", "ratio_range"):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = _coerce(fields[name].default, value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(default: Any, value: Any, where: str) -> Any:
    """Check a scalar against its default's type; YAML reads "1e-3" as a string, so
    numeric strings become floats where a float is expected."""
    if isinstance(default, bool) or default is None or default is dataclasses.MISSING:
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    return value


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict (a parsed YAML file) and build its Config."""
    validate_config_dict(data, source)
    data = dict(data or {})
    extra = {k: data.pop(k) for k in EXTRA_SECTIONS if k in data}
    cfg = _build(Config, data, source)
    cfg.extra = extra
    _check(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML experiment config; `overrides` are dotted keys, e.g. {"train.iters": 10}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value, f"{path}: --set {dotted}")
    return config_from_dict(data, str(path))


def set_dotted(data: dict[str, Any], dotted: str, value: Any, where: str = "config") -> None:
    """data["a"]["b"] = value for "a.b", creating absent or empty (null) sections."""
    node = data
    *parents, leaf = dotted.split(".")
    for depth, key in enumerate(parents):
        if node.get(key) is None:  # absent, or `section:` left empty in the YAML
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            section = ".".join(parents[: depth + 1])
            raise ConfigError(f"{where}: {section} is {type(node).__name__}, not a section")
    node[leaf] = value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    extra = out.pop("extra")
    out.update(extra)
    return out


def _check(cfg: Config, where: str) -> None:
    if not cfg.model.stages or any(not s for s in cfg.model.stages):
        raise ConfigError(f"{where}: model.stages must be a non-empty list of non-empty lists")
    flat = [b for s in cfg.model.stages for b in s]
    if any((not isinstance(b, int)) or b < 1 for b in flat):
        raise ConfigError(f"{where}: model.stages holds 1-based block numbers, got {flat}")
    if len(set(flat)) != len(flat):
        raise ConfigError(f"{where}: model.stages repeats a block: {flat}")
    if cfg.model.decoder.layers < 1:
        raise ConfigError(f"{where}: model.decoder.layers must be >= 1")
    if cfg.model.sum_learnable and cfg.model.fusion != "sum":
        raise ConfigError(f"{where}: model.sum_learnable needs model.fusion: sum, got {cfg.model.fusion!r}")
    if cfg.evaluate.stride <= 0 or cfg.evaluate.stride > cfg.evaluate.crop_size:
        raise ConfigError(f"{where}: evaluate.stride must be in 1..crop_size")
    processes = training_processes(cfg)
    for setting in ("inductive", "transductive"):  # the global batch divides over the workflow's GPUs
        batch_plan(cfg, setting, processes, where)
    from cascade_clip.paper import check_paper_ids

    check_paper_ids(cfg.extra.get("ablations"), where)


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's `global_batch` images are laid out: `processes` x
    `micro_batch` (images one process holds in one forward/backward pass) x `accumulation`
    (passes whose gradients one step sums)."""

    global_batch: int
    processes: int
    micro_batch: int
    accumulation: int

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.processes} process(es) x {self.micro_batch} "
                f"image(s) x {self.accumulation} accumulation step(s)")


def batch_plan(cfg: Config, setting: str, processes: int, where: str = "config") -> BatchPlan:
    """The batch layout of a `setting` run on `processes` processes.

    Without a global batch (`train.global_batch`, for self-training `self_train.global_batch`,
    else the former) every process takes its batch size (`self_train.batch_size` for
    self-training when set, else `train.batch_size`) once per step, as before. With one, each
    process's share is global / processes; a share at most the batch size is one pass of that
    many images, a larger one is accumulated in passes of the batch size. A global batch that
    does not divide raises ConfigError naming the keys."""
    transductive = setting == "transductive"
    batch, batch_key = cfg.train.batch_size, "train.batch_size"
    if transductive and cfg.self_train.batch_size is not None:
        batch, batch_key = cfg.self_train.batch_size, "self_train.batch_size"
    total, key = cfg.train.global_batch, "train.global_batch"
    if transductive and cfg.self_train.global_batch is not None:
        total, key = cfg.self_train.global_batch, "self_train.global_batch"
    if total is None:
        return BatchPlan(batch * processes, processes, batch, 1)
    if total % processes:
        raise ConfigError(f"{where}: {key} {total} does not divide over {processes} training processes "
                          f"(GPUs x nodes); use a number of processes that divides it")
    share = total // processes
    micro = min(batch, share)
    if share % micro:
        raise ConfigError(f"{where}: {key} {total} over {processes} process(es) is {share} images each, "
                          f"not a multiple of {batch_key} {batch}; set {batch_key} to a divisor of {share}")
    return BatchPlan(total, processes, micro, share // micro)


def training_processes(cfg: Config) -> int:
    """Processes of a training job as the config's workflow runs it: one per GPU
    (`workflow.train_gpus`, one CPU process without GPUs) on each of `workflow.train_nodes`."""
    wf = cfg.extra.get("workflow") or {}
    return max(1, int(wf.get("train_gpus") or 0)) * max(1, int(wf.get("train_nodes") or 1))


def shared_cache_stages(base: list[list[int]], runs: list[list[list[int]]]) -> list[list[int]]:
    """The `model.stages` the one feature cache of a workflow is written with, from the
    config's own stages and those of every run that trains from the cache: the config's
    when they tap exactly the blocks those runs tap, else one stage of every block those runs
    tap, ascending. A cache serves any run that taps a subset of its blocks."""
    union = sorted({b for stages in runs for stage in stages for b in stage})
    if not union or set(union) == {b for stage in base for b in stage}:
        return base
    return [union]


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """["train.iters=10", "model.stages=[[12]]"] -> {"train.iters": 10, "model.stages": [[12]]}.

    Values are parsed as YAML, so numbers, booleans and lists come out typed; "1e-3",
    which YAML reads as text, is a number here. The workflow uses this to run ablations of
    one config (`--set model.cascade=false`).
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and _NUMBER_TEXT.match(parsed.strip()):
            parsed = float(parsed)
        out[key.strip()] = parsed
    return out


def add_config_arguments(parser: Any) -> None:
    """The `--config FILE` and repeatable `--set KEY=VALUE` options every stage takes."""
    parser.add_argument("--config", required=True, help="experiment YAML file (config/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.iters=100 (repeatable)",
    )


def config_from_args(args: Any) -> Config:
    return load_config(args.config, parse_overrides(getattr(args, "overrides", None)))
