"""What benchmarks/NOTES.md measured, and when a planned run is the measured setup: the shapes
demo's generated data and wall times, and per-stage rates (train, evaluate, cache)."""

import dataclasses
from dataclasses import dataclass
from typing import Any

from cascade_clip.config import BatchPlan, Config, batch_plan
from cascade_clip.plan.sizes import EncoderShape, dotted, workflow_settings

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
    peak_mib: int | None = None  # peak GPU memory of one process (train: a pass of `batch` images)


VIT_B16 = "ViT 12 blocks x 768, patch 16, embed 512"
PAPER_HEAD = "3 layers, 8 heads, FFN 2048"
H100_TRAIN = "NOTES.md Training, H100"
H100_CAVEAT = ("one process, Triton kernels, random ViT-B/16-shaped encoder, 156 queries, loading with "
               "num_workers 0; multi-GPU scaling not measured")
MEASURED: tuple[Measured, ...] = (
    Measured("train", 2.59, "it", {"device": "gpu", "encoder": VIT_B16, "input": 512, "taps": 7,
                                    "head": PAPER_HEAD, "batch": 4, "amp": True, "path": "vpt"},
             H100_TRAIN, H100_CAVEAT, peak_mib=2332),
    Measured("train", 5.82, "it", {"device": "gpu", "encoder": VIT_B16, "input": 512, "taps": 7,
                                    "head": PAPER_HEAD, "batch": 4, "amp": True, "path": "cache"},
             H100_TRAIN, H100_CAVEAT, peak_mib=1138),
    Measured("evaluate", 2.3, "images", {"device": "gpu", "encoder": VIT_B16, "input": 512, "amp": True},
             H100_TRAIN, "sliding window, one process, measured on 2 images only"),
    Measured("cache", 0.15, "rows", {"device": "cpu", "encoder": VIT_B16, "input": 512, "taps": 7},
             "NOTES.md Feature cache, Throughput", "write_shard end to end on the 2-core development VM"),
)
# What each fact is in the config, for the "not measured" message.
FACT_KEYS = {"device": "GPUs (workflow.*_gpus)", "encoder": "encoder", "input": "input size",
             "taps": "tapped blocks", "head": "model.decoder", "batch": "images per pass and GPU",
             "amp": "train.amp", "path": "model.encoder_mode"}
FACT_VALUES = {("device", "gpu"): "> 0", ("device", "cpu"): "0", ("path", "cache"): "frozen, from the cache",
               ("path", "online"): "frozen, online (cache.enabled: false)",
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
    """The facts of one stage of one run that a measured rate must match (`batch`: the images
    one process holds in one pass, `config.batch_plan` on the workflow's training processes)."""
    from cascade_clip.cache import tapped_blocks

    gpus = {"train": wf["train_gpus"], "evaluate": wf["eval_gpus"], "cache": wf["cache_gpus"]}[stage]
    dec = cfg.model.decoder
    batch = train_batch_plan(cfg, wf).micro_batch
    return {
        "device": "gpu" if gpus else "cpu",
        "encoder": shape.describe(),
        "input": cfg.train.augment.crop_size if stage != "evaluate" else cfg.evaluate.crop_size,
        "taps": len(tapped_blocks(cfg)),
        "head": f"{dec.layers} layers, {dec.heads} heads, FFN {dec.ffn_dim}",
        "batch": batch,
        "amp": cfg.train.amp,
        "path": "vpt" if cfg.model.encoder_mode != "frozen" else "cache" if cfg.cache.enabled else "online",
    }


def train_batch_plan(cfg: Config, wf: dict[str, Any]) -> BatchPlan:
    """A run's batch layout on the workflow's training processes (GPUs x nodes, one on CPU)."""
    processes = max(1, int(wf["train_gpus"])) * max(1, int(wf["train_nodes"]))
    return batch_plan(cfg, cfg.train.setting, processes)


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
            have = dotted(dataclasses.asdict(cfg), key)
        if have != want:
            return f"{key} is {have!r}, measured with {want!r}"
    return None


