"""Train the cascaded decoders: inductive, transductive self-training or fully supervised.

Read `train()` top to bottom; it is the whole story:

  1. join the process group (torchrun) or run alone; seed everything;
  2. decide which classes the decoders are asked about (the "queries"): the seen classes
     in the inductive setting, every class otherwise;
  3. build CLIP + Cascade-CLIP; load the inductive checkpoint (--init) for self-training;
  4. build the data: cached frozen features (--cache) or images through the augmentation;
  5. AdamW over every trainable parameter, lr = linear warm-up then poly decay;
  6. resume from DIR/ckpt_last.pt if asked and present;
  7. the loop: batch -> logits -> (self-training: pseudo-labels) -> focal + dice loss
     -> backward -> step; log, checkpoint, stop on a non-finite loss.

Files written by rank 0 in the run directory DIR:

  DIR/config.yaml     the effective config
  DIR/log.jsonl       one JSON object per logged step: step, loss, lr, time, it_s
  DIR/ckpt_last.pt    resumable checkpoint (every train.checkpoint_interval steps and at the end)
  DIR/ckpt_half.pt    weights at iters * self_train.start_fraction (self-training starts here)
  DIR/model_final.pt  final weights

Shapes: B batch per process, K queries, L tapped blocks, N = h*w tokens, C embedding width,
(H, W) label size (the crop).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from cascade_clip.cache import weights_digest
from cascade_clip.checkpoint import (
    CHECKPOINT_VERSION,
    check_checkpoint,
    load_checkpoint,
    restore_rank_rng,
    rng_state,
    save_checkpoint,
)
from cascade_clip.config import Config, config_to_dict
from cascade_clip.distributed import (
    DistEnv,
    ShardedInfiniteSampler,
    all_gather_object,
    all_reduce_mean,
    init_distributed,
    loader_workers,
    wrap_ddp,
)
from cascade_clip.errors import CascadeClipError, InputError
from cascade_clip.kernels import sigmoid_focal_dice_loss
from cascade_clip.model import CascadeCLIP, TapFeatures, config_class_embeddings, load_clip

IGNORE_INDEX = 255  # == cascade_clip.data.IGNORE_INDEX
UNSEEN_INDEX = 254  # == cascade_clip.data.UNSEEN_INDEX

SETTINGS = ("inductive", "transductive", "fully_supervised")


class NonFiniteLossError(CascadeClipError, ValueError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


# ------------------------------------------------------------------------------------------
# Classes and queries
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassSplit:
    """All classes of a dataset (train-id order), which are unseen, and which are queried.

    `queries[q]` is the train id that query (text embedding / logit channel) q stands for.
    """

    names: tuple[str, ...]
    seen: tuple[int, ...]
    unseen: tuple[int, ...]
    queries: tuple[int, ...]

    @property
    def unseen_names(self) -> list[str]:
        return [self.names[i] for i in self.unseen]

    @property
    def unseen_queries(self) -> list[int]:
        """Query indices of the unseen classes (empty in the inductive setting)."""
        unseen = set(self.unseen)
        return [q for q, c in enumerate(self.queries) if c in unseen]

    def target_lut(self) -> torch.Tensor:
        """(256,) int64 lookup: label value -> query index; train ids that are not queried
        become 255 (ignore); 255 and 254 (unseen, to be pseudo-labelled) stay as they are."""
        lut = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
        lut[UNSEEN_INDEX] = UNSEEN_INDEX
        for q, c in enumerate(self.queries):
            lut[c] = q
        return lut


def dataset_unseen_names(cfg: Config) -> list[str]:
    """The configured unseen class names: a list as given, or a registry split (the
    paper's when `dataset.unseen` is None, another by name)."""
    from cascade_clip.data.registry import unseen_class_names

    return unseen_class_names(cfg.dataset.name, cfg.dataset.unseen, cfg.dataset.root)


def class_split(cfg: Config, setting: str, names: tuple[str, ...] | None = None) -> ClassSplit:
    """Seen / unseen ids from the config's class names; queries by setting."""
    from cascade_clip.data import load_classes, resolve_split

    names = tuple(names) if names is not None else tuple(load_classes(cfg.dataset.root))
    seen, unseen = resolve_split(names, dataset_unseen_names(cfg))
    queries = seen if setting == "inductive" else list(range(len(names)))
    return ClassSplit(names, tuple(seen), tuple(unseen), tuple(queries))


def text_embeddings(
    cfg: Config,
    names: tuple[str, ...],
    text_path: str | Path | None,
    clip: nn.Module,
    tokenizer: Any,
    device: torch.device,
) -> torch.Tensor:
    """(K_all, C) float32 class embeddings on `device`: from the text cache if given, else
    computed now with the frozen text tower and the config's template set."""
    if text_path is None:
        return config_class_embeddings(cfg, clip, tokenizer, names, device)
    from cascade_clip.text_cache import load_text_embeddings

    emb, cached_names = load_text_embeddings(text_path, cfg)
    if tuple(cached_names) != tuple(names):
        raise InputError(
            f"{text_path}: text embeddings are for classes {list(cached_names)[:4]}..., "
            f"the dataset has {list(names)[:4]}... ({len(cached_names)} vs {len(names)})"
        )
    return emb.float().to(device)


# ------------------------------------------------------------------------------------------
# Learning rate, masks, pseudo-labels
# ------------------------------------------------------------------------------------------


def learning_rate(step: int, base_lr: float, iters: int, warmup: int, power: float, min_lr: float) -> float:
    """lr for optimisation step `step` (0-based): poly decay from base_lr to min_lr over
    `iters`, multiplied by a linear warm-up factor (step+1)/warmup for the first steps."""
    progress = min(step, iters) / max(iters, 1)
    lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    if step < warmup:
        lr *= (step + 1) / warmup
    return lr


def count_masks(target: torch.Tensor, num_queries: int) -> torch.Tensor:
    """target (B, H, W) query ids / 255 -> number of (b, k) with a pixel of class k (fp32 scalar)."""
    b = target.shape[0]
    ids = target.reshape(b, -1).clamp(max=num_queries)  # everything >= K lands in bin K
    present = torch.zeros(b, num_queries + 1, device=target.device)
    present.scatter_(1, ids, 1.0)
    return present[:, :num_queries].sum()


def subsample_labels(labels: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, H, W) -> (B, ceil(H/stride), ceil(W/stride)): every `stride`-th label per axis,
    starting at the middle of the first cell (stride 1 returns `labels` itself)."""
    if stride == 1:
        return labels
    first = stride // 2
    return labels[:, first::stride, first::stride]


@torch.no_grad()
def pseudo_label(logits: torch.Tensor, target: torch.Tensor, unseen_queries: list[int]) -> torch.Tensor:
    """Self-training targets: pixels marked 254 get the argmax over the UNSEEN queries of
    the current prediction; every other pixel keeps its label.

    logits (B, K, h, w) (detached here), target (B, H, W) -> (B, H, W) int64.
    """
    marked = target == UNSEEN_INDEX
    if not marked.any():
        return target
    if not unseen_queries:
        return target.masked_fill(marked, IGNORE_INDEX)
    idx = torch.tensor(unseen_queries, device=logits.device)
    scores = logits.detach().float().index_select(1, idx)
    scores = F.interpolate(scores, size=target.shape[-2:], mode="bilinear", align_corners=False)
    pseudo = idx[scores.argmax(dim=1)]  # (B, H, W) query ids
    return torch.where(marked, pseudo, target)


# ------------------------------------------------------------------------------------------
# Model step and data
# ------------------------------------------------------------------------------------------


class TrainStep(nn.Module):
    """What DDP wraps: images (online encoder) or cached tap features -> logits (B, K, h, w).

    DDP hooks gradients only through `forward`, so the head-from-cache path needs a module
    whose forward takes the cached tensors.
    """

    def __init__(self, model: CascadeCLIP):
        super().__init__()
        self.model = model

    def forward(
        self,
        text: torch.Tensor,
        images: torch.Tensor | None = None,
        taps: torch.Tensor | None = None,
        global_token: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if images is not None:
            if self.model.cfg.encoder_mode == "frozen":
                with torch.no_grad():  # nothing in a frozen encoder needs a gradient
                    feats = self.model.encode(images)
            else:
                feats = self.model.encode(images)
        else:
            feats = TapFeatures(taps=taps, global_token=global_token, grid=grid or square_grid(taps.shape[2]))
        return self.model.forward_features(feats, text)


class CompiledStep:
    """The step module, compiled by `torch.compile` when `train.compile` asks for it.

    Training shapes are static (fixed crop, drop_last batches, fixed queries), so the
    forward and its backward compile once; "reduce-overhead" replays them as CUDA graphs,
    which removes the head step's per-kernel launch cost on a GPU. A step whose compiled
    call fails (a backend missing, a graph it cannot capture) falls back to the eager
    module with a one-line warning; the eager call then runs the step, so a real bug still
    raises. Evaluation never compiles: its sliding windows change shape.
    """

    def __init__(self, module: nn.Module, mode: str):
        self.eager = module
        self.compiled = None if mode == "none" else torch.compile(module, mode=mode, dynamic=False)
        self.mode = mode

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # compile-time failures come in many types
                print(f"train.compile={self.mode}: compiled step failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); continuing eagerly")
                self.compiled = None
        return self.eager(*args, **kwargs)


def square_grid(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise InputError(f"{n} cached tokens per image do not form a square grid")
    return side, side


class SeededItems(torch.utils.data.Dataset):
    """Indexes a dataset with the sampler's (global position, index) pairs.

    The augmentation of an item is a function of (seed, epoch, index) in
    SegmentationDataset; the epoch is the stream position // dataset size. So every item
    looks the same whichever worker loads it, however many ranks share the stream, and
    whether or not the run was resumed.
    """

    def __init__(self, base: torch.utils.data.Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        pos, index = key
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(pos // len(self.base))
        return self.base[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict[str, Any]]:
        # A batched read where the base has one (the feature cache) and no augmentation
        # depends on the epoch; otherwise item by item.
        if hasattr(self.base, "__getitems__") and not hasattr(self.base, "set_epoch"):
            return self.base.__getitems__([index for _, index in keys])
        return [self[key] for key in keys]


def cache_tap_rows(dataset: Any, blocks: list[int], where: str) -> list[int] | None:
    """Rows of the cached taps this model uses, or None when they are all used in order.

    A cache may hold more blocks than a model taps (the single-decoder baseline on the
    last block reads the main run's cache)."""
    cached = getattr(dataset, "blocks", None)
    if cached is None:
        return None
    cached = [int(b) for b in cached]
    missing = [b for b in blocks if b not in cached]
    if missing:
        raise InputError(f"{where}: cache holds blocks {cached}, the model taps {blocks} ({missing} missing)")
    rows = [cached.index(b) for b in blocks]
    return None if rows == list(range(len(cached))) else rows


def build_train_dataset(cfg: Config, setting: str, cache: str | Path | None) -> torch.utils.data.Dataset:
    """Cached frozen features (--cache) or images with the training augmentation."""
    if cache is not None:
        if cfg.model.encoder_mode != "frozen":
            raise InputError(f"{cache}: a feature cache serves encoder_mode 'frozen' only, not 'vpt'")
        from cascade_clip.cache import FeatureCacheDataset

        return FeatureCacheDataset(cache, cfg, cfg.dataset.train_split, setting)
    from cascade_clip.data import SegmentationDataset
    from cascade_clip.data.transforms import train_transform

    return SegmentationDataset(
        cfg.dataset.root,
        cfg.dataset.train_split,
        unseen=dataset_unseen_names(cfg),
        mode=setting,
        transform=train_transform(cfg.train.augment),
        drop_unseen_images=cfg.dataset.drop_unseen_images,
        seed=training_seed(cfg),
    )


def training_seed(cfg: Config) -> int:
    """The seed of everything random in a training run (head init, sample order, dropout,
    online augmentation): train.seed, else the experiment seed. The world, the CLIP and the
    feature cache follow the experiment seed alone, so runs of several training seeds share
    them."""
    return cfg.seed if cfg.train.seed is None else cfg.train.seed


# train-section keys that change how a run goes, not what it trains: a run resumes across them
RUNTIME_KEYS = ("num_workers", "prefetch_factor", "log_interval", "checkpoint_interval", "compile")


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the config a checkpoint was written with and this one, in what a
    run trains (seed, CLIP, model, data, schedule): "train.iters: 1000 -> 1200"."""

    def recipe(config: dict[str, Any]) -> dict[str, Any]:
        train = {k: v for k, v in config.get("train", {}).items() if k not in RUNTIME_KEYS}
        model = {k: v for k, v in config.get("model", {}).items() if k != "seen_calibration"}
        keys = ("seed", "clip", "dataset", "self_train")
        return {**{k: config.get(k) for k in keys}, "train": train, "model": model}

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out

    a = flat(json.loads(json.dumps(recipe(saved))))
    b = flat(json.loads(json.dumps(recipe(current))))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def batch_size_per_process(cfg: Config, setting: str) -> int:
    """train.batch_size, or self_train.batch_size for self-training when set (the release
    self-trains VOC with 8 images per GPU, trains with 4)."""
    if setting == "transductive" and cfg.self_train.batch_size is not None:
        return cfg.self_train.batch_size
    return cfg.train.batch_size


def make_loader(
    dataset: torch.utils.data.Dataset, cfg: Config, env: DistEnv, consumed: int, batch_size: int
) -> torch.utils.data.DataLoader:
    """An endless loader of this rank's share, starting after `consumed` global items."""
    seed = training_seed(cfg)
    sampler = ShardedInfiniteSampler(len(dataset), env.rank, env.world_size, seed=seed, start=consumed)
    workers = loader_workers(cfg.train.num_workers)
    return torch.utils.data.DataLoader(
        SeededItems(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=cfg.train.prefetch_factor if workers > 0 else None,
        generator=torch.Generator().manual_seed(training_seed(cfg)),  # keeps the global RNG untouched
    )


def model_inputs(batch: dict[str, Any], device: torch.device, tap_rows: list[int] | None) -> dict[str, Any]:
    """A collated batch -> keyword arguments of TrainStep (without the text)."""
    if "taps" in batch:
        taps = batch["taps"].to(device, non_blocking=True)  # (B, L, N, C) fp16
        if tap_rows is not None:
            taps = taps[:, tap_rows]
        grid = tuple(int(v) for v in batch["grid"][0]) if "grid" in batch else None
        return {
            "taps": taps.transpose(0, 1).float(),  # (L, B, N, C)
            "global_token": batch["global_token"].to(device, non_blocking=True).float(),
            "grid": grid,
        }
    return {"images": batch["image"].to(device, non_blocking=True)}


# ------------------------------------------------------------------------------------------
# Checkpoints and log
# ------------------------------------------------------------------------------------------


def checkpoint_state(
    model: CascadeCLIP,
    cfg: Config,
    split: ClassSplit,
    setting: str,
    step: int,
    elapsed: float,
    clip_weights: str,
) -> dict[str, Any]:
    """The weights-only part of a checkpoint (what evaluation and --init need)."""
    return {
        "version": CHECKPOINT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()},
        "config": config_to_dict(cfg),
        "step": step,
        "classes": list(split.names),
        "unseen": split.unseen_names,
        "setting": setting,
        "elapsed": elapsed,
        "clip_weights": clip_weights,
    }


def log_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop records past `step` (written after the checkpoint a resumed run restarts from)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


# ------------------------------------------------------------------------------------------
# The training run
# ------------------------------------------------------------------------------------------


def train(
    cfg: Config,
    out_dir: str | Path,
    *,
    cache: str | Path | None = None,
    text: str | Path | None = None,
    init: str | Path | None = None,
    resume: bool = False,
    dataset: torch.utils.data.Dataset | None = None,
    class_names: tuple[str, ...] | None = None,
    on_step: Callable[[int], None] | None = None,
    device: str | None = None,
) -> Path:
    """Run (or resume) one training run; returns DIR/model_final.pt.

    `dataset`/`class_names` replace the configured data (tests, benchmarks); `on_step(step)`
    is called after every completed step (tests use it to interrupt a run).
    """
    out_dir = Path(out_dir)
    setting = cfg.train.setting
    if setting not in SETTINGS:
        raise InputError(f"train.setting must be one of {SETTINGS}, got {setting!r}")
    iters = cfg.self_train.iters if setting == "transductive" else cfg.train.iters
    half_step = max(1, int(iters * cfg.self_train.start_fraction))
    ckpt_last, ckpt_half = out_dir / "ckpt_last.pt", out_dir / "ckpt_half.pt"
    final = out_dir / "model_final.pt"
    log_path = out_dir / "log.jsonl"

    # 1. processes and seeds; a run folder left by another config is started over, not resumed
    env = init_distributed(device)
    if resume and ckpt_last.is_file():
        changed = recipe_changes(load_checkpoint(ckpt_last)["config"], config_to_dict(cfg))
        if changed:
            if env.is_main:
                print(f"{ckpt_last}: written for another config ({'; '.join(changed[:3])}); "
                      "starting this run over")
            resume = False
    torch.manual_seed(training_seed(cfg))
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    # 2. classes and queries
    if class_names is None and dataset is not None:
        class_names = getattr(dataset, "classes", None)
    split = class_split(cfg, setting, class_names)
    lut = split.target_lut().to(env.device)
    unseen_queries = split.unseen_queries
    num_queries = len(split.queries)

    # 3. model and text queries
    if cfg.train.augment.crop_size != cfg.clip.image_size and dataset is None and cache is None:
        raise InputError(
            f"train.augment.crop_size {cfg.train.augment.crop_size} must equal clip.image_size "
            f"{cfg.clip.image_size} (the encoder's input)"
        )
    clip, tokenizer = load_clip(cfg.clip)
    clip.to(env.device)
    clip_digest = weights_digest(cfg.clip)  # recorded in every checkpoint
    text_all = text_embeddings(cfg, split.names, text, clip, tokenizer, env.device)
    queries = text_all[list(split.queries)]  # (K, C)
    model = CascadeCLIP(clip, cfg.model).to(env.device)  # holds clip.visual only
    if init is not None and not (resume and ckpt_last.is_file()):
        state = load_checkpoint(init)
        check_checkpoint(state, cfg, init, split.names, split.unseen_names)
        model.load_trainable_state_dict(state["model"])
    model.train()
    step_module: nn.Module = TrainStep(model)
    if env.distributed:
        step_module = wrap_ddp(step_module, env)
    step_fn = CompiledStep(step_module, cfg.train.compile)

    # 4. data
    if dataset is None:
        dataset = build_train_dataset(cfg, setting, cache)
    tap_rows = cache_tap_rows(dataset, CascadeCLIP.tapped_blocks(cfg.model), str(cache or "dataset"))
    batch_size = batch_size_per_process(cfg, setting)
    if len(dataset) < batch_size:
        raise InputError(f"{cache or cfg.dataset.root}: {len(dataset)} items, fewer than one batch")

    # 5. optimiser (the lr is set every step from `learning_rate`)
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused AdamW: one kernel for all parameters (demo head, one CPU thread: 1.4 ms a step
    # against 5.3 ms for the default loop over tensors)
    fused = env.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused)

    # 6. resume
    global_batch = batch_size * env.world_size
    step, consumed, elapsed_before = 0, 0, 0.0  # consumed: items of the global sample stream
    if resume and ckpt_last.is_file():
        state = load_checkpoint(ckpt_last)
        check_checkpoint(state, cfg, ckpt_last, split.names, split.unseen_names)
        if state["setting"] != setting:
            raise InputError(f"{ckpt_last}: written by a {state['setting']} run, this run is {setting}")
        model.load_trainable_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_before = int(state["step"]), float(state.get("elapsed", 0.0))
        consumed = int(state["sampler"]["consumed"])  # holds even if the world size changed
        if step >= half_step and not ckpt_half.is_file():
            # Its weights cannot be recomputed from a later step: never stand in the final ones.
            raise InputError(
                f"{ckpt_half}: missing, and {ckpt_last} is at step {step}, past the half-way step "
                f"{half_step} it held; delete {ckpt_last} to train this run again from the start"
            )
        saved_world = len(state["rng"])
        restore_rank_rng(state["rng"], env.rank, training_seed(cfg), step)
        if env.is_main:
            if saved_world != env.world_size:
                print(
                    f"{ckpt_last}: written by {saved_world} process(es), resumed on {env.world_size}: "
                    "the sample stream continues; ranks without a saved state get fresh seeded generators"
                )
            truncate_log(log_path, step)
            record = {"step": step, "event": "resume", "world_size": env.world_size}
            log_line(log_path, {**record, "saved_world_size": saved_world})
    elif env.is_main:
        log_path.unlink(missing_ok=True)
    batches = iter(make_loader(dataset, cfg, env, consumed=consumed, batch_size=batch_size))
    last_saved = step if resume and ckpt_last.is_file() else None  # step held by ckpt_last.pt

    def save(path: Path, full: bool, elapsed: float) -> None:
        nonlocal last_saved
        rngs = all_gather_object(rng_state()) if full else None  # every rank takes part
        if full:
            last_saved = step
        if not env.is_main:
            return
        state = checkpoint_state(model, cfg, split, setting, step, elapsed, clip_digest)
        if full:
            state["optimizer"] = optimizer.state_dict()
            state["scheduler"] = {"name": "warmup_poly", "step": step}
            state["sampler"] = {"consumed": consumed, "seed": training_seed(cfg)}
            state["rng"] = rngs
        save_checkpoint(state, path)

    # 7. the loop
    amp = cfg.train.amp and env.device.type == "cuda"
    bar = tqdm(total=iters, initial=step, disable=not env.is_main, dynamic_ncols=True, desc=setting)
    t_start, t_log, steps_since_log = time.time(), time.time(), 0
    loss_sum = torch.zeros((), device=env.device)
    while step < iters:
        lr = learning_rate(
            step, cfg.train.lr, iters, cfg.train.warmup_iters, cfg.train.poly_power, cfg.train.min_lr
        )
        for group in optimizer.param_groups:
            group["lr"] = lr

        batch = next(batches)
        labels = subsample_labels(batch["label"], cfg.train.loss_stride)  # (B, H, W), or every n-th pixel
        target = lut[labels.to(env.device, non_blocking=True).long()]  # query ids
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = step_fn(queries, **model_inputs(batch, env.device, tap_rows))  # (B, K, h, w)
        logits = logits.float()
        if setting == "transductive":
            target = pseudo_label(logits, target, unseen_queries)
        num_masks = all_reduce_mean(count_masks(target, num_queries))  # M, averaged over ranks
        loss = sigmoid_focal_dice_loss(
            logits,
            target,
            ignore_index=IGNORE_INDEX,
            ignore_as_negative=cfg.train.ignore_as_negative,
            num_masks=num_masks,
        )
        mean_loss = all_reduce_mean(loss.detach())  # NaN on any rank makes it NaN on all
        if not torch.isfinite(mean_loss):
            kept = "no checkpoint yet" if last_saved is None else f"{ckpt_last} holds step {last_saved}"
            raise NonFiniteLossError(
                f"{out_dir}: loss is {mean_loss.item()} at step {step + 1}; stopped ({kept})"
            )

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        consumed += global_batch
        loss_sum += mean_loss
        steps_since_log += 1
        bar.update(1)

        if step % cfg.train.log_interval == 0 or step == iters:
            now = time.time()
            it_s = steps_since_log / max(now - t_log, 1e-9)
            record = {
                "step": step,
                "loss": (loss_sum / steps_since_log).item(),
                "lr": lr,
                "time": round(elapsed_before + now - t_start, 3),
                "it_s": round(it_s, 3),
            }
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", it_s=f"{it_s:.2f}")
            if env.is_main:
                log_line(log_path, record)
            t_log, steps_since_log = now, 0
            loss_sum.zero_()
        elapsed = elapsed_before + time.time() - t_start
        if step == half_step:
            save(ckpt_half, full=False, elapsed=elapsed)
        if step % cfg.train.checkpoint_interval == 0 or step == iters:
            save(ckpt_last, full=True, elapsed=elapsed)
        if on_step is not None:
            on_step(step)
    bar.close()

    if env.is_main:
        save(final, full=False, elapsed=elapsed_before + time.time() - t_start)
    return final
