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
- **the feature cache**, when some run is `model.encoder_mode: frozen`, from the shard
  layout of `cascade_clip.cache` exactly: per (image, view) row, the taps (L tapped blocks x
  N tokens x C channels, `cache.encoding`: fp16 or int8), the global token (C, fp16) and
  the per-row metadata (image index int64, view index int16, id S<n>, view JSON S512, class
  presence uint8 x K, done flag uint8, checksum uint32); with the other encoding's size, and
  which frozen runs read it and which train online without it (`cache.enabled: false`);
- **checkpoints** per run: the trainable state dict (`CascadeCLIP.trainable_state_dict`:
  head, vpt prompts, fixed random tap projections) in ckpt_half.pt and model_final.pt, plus
  AdamW's two moments and a step counter per trainable tensor in ckpt_last.pt. Counts come
  from the model classes themselves, built with the vision tower on the meta device: no
  CLIP weights are read and nothing touches the network;
- **the batch per training step** of every run on the workflow's GPUs (`config.batch_plan`:
  the global batch as processes x images per pass x accumulation steps) and each process's
  peak GPU memory where NOTES.md measured a pass of that many images (else "not measured");
- **time**, only where benchmarks/NOTES.md holds a measured figure for the same setup
  (`MEASURED`), else "not measured"; a step of k accumulated passes counts k passes.

`check_cache_space` is the cache writer's guard: it refuses a shard the file system cannot
hold, naming the folder, the bytes needed and free, and the config keys that shrink it.

Sizes print in decimal units (1 GB = 10^9 bytes).

Modules: `sizes` (what gets written, and the writer's space check), `measured` (what
benchmarks/NOTES.md measured and when a run matches it), `grid` (each run's parameters as the
paper counts them, the grid's projected GPU hours); this one assembles and prints the plan.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade_clip.config import Config, load_config, shared_cache_stages
from cascade_clip.plan.grid import gpu_hour_lines, nearest_measured, parameter_lines
from cascade_clip.plan.measured import (
    DEMO_MEASURED,
    DEMO_MEASURED_KEYS,
    SHAPES_CLIP_BYTES,
    SHAPES_MEASURED,
    SHAPES_WORLD_BYTES,
    VIT_B16,
    demo_mismatch,
    match_measured,
    pretrain_mismatch,
    run_facts,
    shapes_mismatch,
    train_batch_plan,
)
from cascade_clip.plan.sizes import (
    LABEL_ARCHIVES,
    CacheRow,
    CheckpointSizes,
    EncoderShape,
    NotEnoughSpaceError,
    Size,
    cache_job_minutes,
    cache_row_for,
    check_cache_space,
    checkpoint_sizes,
    encoder_shape,
    existing_ancestor,
    fmt_bytes,
    fmt_duration,
    index_row_bytes,
    meta_vision_tower,
    num_classes,
    run_configs,
    same_file_system,
    shard_allowance,
    shard_data_bytes,
    split_facts,
    total,
    workflow_settings,
)

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
    used_by: list[str]  # frozen runs that train from the cache
    images_source: str
    online: list[str] = field(default_factory=list)  # frozen runs without it (cache.enabled: false)
    blocks: list[int] = field(default_factory=list)  # what the cache holds (every reading run's taps)

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
    from cascade_clip.data.registry import cross_eval_targets, download_folders

    datasets = {cfg.dataset.name: cfg.dataset.root}
    for name, root in cross_eval_targets(raw).items():  # cross_eval, and the suite with open_vocab
        datasets.setdefault(name, root)
    visual = meta_vision_tower(cfg)
    plan = Plan(str(path), cfg, raw, wf, encoder_shape(visual), datasets, run_cfgs=run_cfgs)

    sources = load_sources()
    for name in dict.fromkeys(f for n in datasets for f in download_folders(n)):  # voc21: voc12's files
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
        cached = [run for run in frozen if run_cfgs[run].cache.enabled]
        facts = split_facts(cfg, cfg.dataset.name, cfg.dataset.root, cfg.dataset.train_split)
        classes = num_classes(cfg.dataset.name, cfg.dataset.root, cfg.dataset.source)
        id_bytes = facts.id_bytes or 16
        # one cache for every run that reads it: every block they tap (as workflow/rules/cache.smk)
        stages = shared_cache_stages(cfg.model.stages, [run_cfgs[run].model.stages for run in cached])
        cache_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, stages=stages))
        plan.cache = CachePlan(
            row=cache_row_for(cache_cfg, plan.shape, classes, id_bytes), images=facts.images,
            views=int(cfg.cache.views_per_image), shards=int(wf["cache_shards"]),
            index_row=index_row_bytes(classes, id_bytes), used_by=cached, images_source=facts.source,
            online=[run for run in frozen if run not in cached],
            blocks=[block for stage in stages for block in stage],
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

    # the batch per step and per GPU
    lines.append("")
    lines.extend(_batch_lines(plan))

    # time
    lines.append("")
    lines.extend(_time_lines(plan))

    # the grid: parameters as the paper counts them, projected GPU hours (plan/grid.py)
    lines.append("")
    lines.extend(parameter_lines(plan))
    lines.append("")
    lines.extend(gpu_hour_lines(plan))
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
    online = (f"run(s) {', '.join(cache.online)} train online from the images, encoding every step "
              "(cache.enabled: false)")
    if cache.used_by:
        lines = [f"Feature cache (read by run(s) {', '.join(cache.used_by)}; in {folder}/; {_free(folder)})",
                 *_cache_sharing_lines(plan)]
        if cache.online:
            lines.append(f"  {online}")
    else:
        lines = [f"Feature cache: none written: {online}; were it enabled (cache.enabled: true), "
                 f"in {folder}/ ({_free(folder)}):"]
    lines.append(
        f"  per image-view: {row.total:,} bytes ({fmt_bytes(row.total)}) = {row.num_taps} taps x "
        f"{side}x{side} tokens x {row.embed_dim} channels {row.encoding} ({row.taps:,}; cache.encoding) "
        f"+ global token fp16 ({row.global_token:,}) + labels/view metadata ({row.metadata:,})"
    )
    if cache.images is None:
        lines.append(f"  images: ? (dataset.train_split {cfg.dataset.train_split!r} is not known "
                     "before prepare): total ?")
        if cache.used_by:
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
    other = "fp16" if row.encoding == "int8" else "int8"
    other_data = sum(map(dataclasses.replace(row, encoding=other).shard_bytes, cache.shard_rows()))
    lines.append(f"  as {other} (cache.encoding: {other}): {fmt_bytes(other_data + index)} in all")
    if cache.used_by:
        lines.append("  without it (cache.enabled: false): no cache on disk; the frozen run(s) train online "
                     "from the images (training time below)")
        disk.append(("feature cache", Size(data + index), str(folder)))
    return lines


def _train_time(rcfg: Config, shape: EncoderShape, wf: dict[str, Any], iters: int) -> str:
    m, why = match_measured("train", run_facts(rcfg, shape, "train", wf))
    if m is None:
        return f"not measured: {why}"
    passes = train_batch_plan(rcfg, wf).accumulation
    per_step = f"{passes} passes a step, " if passes > 1 else ""
    return f"~{fmt_duration(iters * passes / m.rate)} at {m.rate} it/s ({per_step}{m.source}: {m.caveat})"


def _batch_lines(plan: Plan) -> list[str]:
    """Each run's batch per step on the workflow's GPUs and what one GPU holds."""
    wf = plan.workflow
    gpus, nodes = int(wf["train_gpus"]), int(wf["train_nodes"])
    where = f"{gpus} GPU(s) x {nodes} node(s)" if gpus else "one CPU process (workflow.train_gpus 0)"
    lines = [f"Batch per training step on {where} (train.global_batch, kept on any number of GPUs by "
             "accumulating passes), and one GPU's peak memory for a pass of its images"]
    for run, rcfg in plan.run_cfgs.items():
        b = train_batch_plan(rcfg, wf)
        facts = run_facts(rcfg, plan.shape, "train", wf)
        m, _ = match_measured("train", facts)
        if m is not None and m.peak_mib is not None:
            memory = f"{m.peak_mib:,} MiB ({m.source})"
        else:
            near, diffs = nearest_measured("train", facts)
            memory = "not measured" + (f" (the nearest, {near.source}: {near.peak_mib:,} MiB; this run "
                                       f"differs: {', '.join(diffs)})"
                                       if near is not None and near.peak_mib is not None else "")
        lines.append(f"  {run:<18} {b.describe()}; per GPU: {memory}")
    return lines


def _cache_sharing_lines(plan: Plan) -> list[str]:
    """Which blocks the one cache holds and which each run reads, when more than one run reads it."""
    from cascade_clip.cache import tapped_blocks

    if plan.cache is None or len(plan.cache.used_by) < 2:
        return []
    runs = "; ".join(f"{run} [{','.join(map(str, tapped_blocks(plan.run_cfgs[run])))}]"
                     for run in plan.cache.used_by)
    return [f"  one cache of blocks [{', '.join(map(str, plan.cache.blocks))}] shared by {runs}"]


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
    if plan.cache is not None and plan.cache.used_by:
        m, why = match_measured("cache", run_facts(cfg, plan.shape, "cache", wf))
        if m is not None and plan.cache.rows is not None:
            secs = plan.cache.rows / m.rate
            lines.append(f"  cache: ~{fmt_duration(secs)} for {plan.cache.rows:,} rows at {m.rate} rows/s "
                         f"({m.source}: {m.caveat})")
        else:
            lines.append(f"  cache: not measured: {why}")
    for run, rcfg in plan.run_cfgs.items():
        iters = rcfg.self_train.iters if rcfg.train.setting == "transductive" else rcfg.train.iters
        lines.append(f"  train {run} ({iters:,} it): {_train_time(rcfg, plan.shape, wf, iters)}")
        if rcfg.model.encoder_mode == "frozen":  # the other way of training this run
            cached = rcfg.cache.enabled
            other = dataclasses.replace(rcfg, cache=dataclasses.replace(rcfg.cache, enabled=not cached))
            way = "online (cache.enabled: false)" if cached else "from the cache (cache.enabled: true)"
            lines.append(f"    {way}: {_train_time(other, plan.shape, wf, iters)}")
    m, why = match_measured("evaluate", run_facts(cfg, plan.shape, "evaluate", wf))
    val = split_facts(cfg, cfg.dataset.name, cfg.dataset.root, cfg.dataset.val_split).images
    if m is not None and val:
        lines.append(f"  evaluate ({val:,} images a run): ~{fmt_duration(val / m.rate)} at {m.rate} "
                     f"images/s ({m.source}: {m.caveat})")
    else:
        lines.append(f"  evaluate: not measured: {why}")
    return lines


__all__ = [
    "DEMO_MEASURED_KEYS",
    "SHAPES_MEASURED",
    "VIT_B16",
    "NotEnoughSpaceError",
    "Plan",
    "cache_job_minutes",
    "check_cache_space",
    "checkpoint_sizes",
    "fmt_bytes",
    "format_plan",
    "make_plan",
    "shard_allowance",
    "shard_data_bytes",
]
