"""`train()`: one training run, read top to bottom (the steps are in cascade_clip.train)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from cascade_clip.cache import weights_digest
from cascade_clip.checkpoint import check_checkpoint, load_checkpoint
from cascade_clip.classes import SETTINGS, ClassSplit, class_split
from cascade_clip.config import Config
from cascade_clip.data import IGNORE_INDEX
from cascade_clip.distributed import DistEnv, all_reduce_mean, init_distributed, wrap_ddp
from cascade_clip.errors import CascadeClipError, InputError
from cascade_clip.kernels.seg_loss import sigmoid_focal_dice_loss
from cascade_clip.model import CascadeCLIP, load_clip
from cascade_clip.text_cache import text_embeddings
from cascade_clip.train.checkpointing import (
    Checkpointer,
    Progress,
    RunFiles,
    log_line,
    resumable_state,
    write_run_config,
)
from cascade_clip.train.inputs import (
    batch_size_per_process,
    build_train_dataset,
    cache_tap_rows,
    make_loader,
    training_seed,
)
from cascade_clip.train.provenance import run_inputs
from cascade_clip.train.step import (
    CompiledStep,
    TrainStep,
    count_masks,
    learning_rate,
    model_inputs,
    pseudo_label,
    subsample_labels,
)


class NonFiniteLossError(CascadeClipError, ValueError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


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
    files = RunFiles(Path(out_dir))
    setting = cfg.train.setting
    if setting not in SETTINGS:
        raise InputError(f"train.setting must be one of {SETTINGS}, got {setting!r}")
    iters = cfg.self_train.iters if setting == "transductive" else cfg.train.iters
    half_step = max(1, int(iters * cfg.self_train.start_fraction))

    # 1. processes and seeds
    env = init_distributed(device)
    torch.manual_seed(training_seed(cfg))
    if env.is_main:
        write_run_config(files, cfg)

    # 2. classes and queries
    if class_names is None and dataset is not None:
        class_names = getattr(dataset, "classes", None)
    split = class_split(cfg, setting, class_names)

    # 3. model and text queries; self-training starts from the inductive weights (--init)
    if cfg.train.augment.crop_size != cfg.clip.image_size and dataset is None and cache is None:
        raise InputError(
            f"train.augment.crop_size {cfg.train.augment.crop_size} must equal clip.image_size "
            f"{cfg.clip.image_size} (the encoder's input)"
        )
    model, queries = build_model(cfg, split, text, env)
    init_state = None
    if init is not None:
        init_state = load_checkpoint(init)
        check_checkpoint(init_state, cfg, init, split.names, split.unseen_names)

    # 4. data
    if dataset is None:
        dataset = build_train_dataset(cfg, setting, cache)
    tap_rows = cache_tap_rows(dataset, CascadeCLIP.tapped_blocks(cfg.model), str(cache or "dataset"))
    batch_size = batch_size_per_process(cfg, setting)
    if len(dataset) < batch_size:
        raise InputError(f"{cache or cfg.dataset.root}: {len(dataset)} items, fewer than one batch")

    # 5. resume, or start: rank 0 compares DIR/ckpt_last.pt with this recipe and what this run
    #    consumes (cascade_clip.train.provenance); a run left by another recipe or other inputs
    #    is started over, not resumed
    clip_weights = weights_digest(cfg.clip)

    def record_inputs(saved: dict | None) -> dict:
        inputs, files_fingerprint = run_inputs(clip_weights, queries, init_state, dataset, saved)
        return {"inputs": inputs, "dataset_files": files_fingerprint}

    resume_state, record = resumable_state(files, cfg, env, resume, record_inputs)
    if init_state is not None and resume_state is None:
        model.load_trainable_state_dict(init_state["model"])
    model.train()
    step_module: nn.Module = wrap_ddp(TrainStep(model), env) if env.distributed else TrainStep(model)
    step_fn = CompiledStep(step_module, cfg.train.compile)

    # 6. optimiser (the lr is set every step from `learning_rate`); start, or resume
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused AdamW: one kernel for all parameters (demo head, one CPU thread: 1.4 ms a step
    # against 5.3 ms for the default loop over tensors)
    fused = env.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused)
    ckpt = Checkpointer(files, model, optimizer, cfg, split, setting, clip_weights, record, env)
    progress = ckpt.start() if resume_state is None else ckpt.resume(resume_state, half_step)
    batches = iter(make_loader(dataset, cfg, env, consumed=progress.consumed, batch_size=batch_size))

    # 7. the loop: batch -> logits -> (self-training: pseudo-labels) -> loss -> step
    lut, unseen_queries = split.target_lut().to(env.device), split.unseen_queries
    amp = cfg.train.amp and env.device.type == "cuda"
    log = StepLog(files.log, cfg.train.log_interval, iters, progress, setting, env)
    while progress.step < iters:
        lr = learning_rate(
            progress.step, cfg.train.lr, iters, cfg.train.warmup_iters, cfg.train.poly_power, cfg.train.min_lr
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
        num_masks = all_reduce_mean(count_masks(target, len(split.queries)))  # M, averaged over ranks
        loss = sigmoid_focal_dice_loss(
            logits,
            target,
            ignore_index=IGNORE_INDEX,
            ignore_as_negative=cfg.train.ignore_as_negative,
            num_masks=num_masks,
        )
        mean_loss = all_reduce_mean(loss.detach())  # NaN on any rank makes it NaN on all
        if not torch.isfinite(mean_loss):
            last = progress.last_saved
            kept = "no checkpoint yet" if last is None else f"{files.last} holds step {last}"
            raise NonFiniteLossError(
                f"{files.dir}: loss is {mean_loss.item()} at step {progress.step + 1}; stopped ({kept})"
            )

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step += 1
        progress.consumed += batch_size * env.world_size
        log.add(mean_loss, lr)

        elapsed = log.elapsed()
        if progress.step == half_step:
            ckpt.save(files.half, progress, full=False, elapsed=elapsed)
        if progress.step % cfg.train.checkpoint_interval == 0 or progress.step == iters:
            ckpt.save(files.last, progress, full=True, elapsed=elapsed)
        if on_step is not None:
            on_step(progress.step)
    log.close()

    if env.is_main:
        ckpt.save(files.final, progress, full=False, elapsed=log.elapsed())
    return files.final


def build_model(
    cfg: Config, split: ClassSplit, text: str | Path | None, env: DistEnv
) -> tuple[CascadeCLIP, torch.Tensor]:
    """The frozen CLIP wrapped in Cascade-CLIP on this rank's device, and the (K, C) text
    embeddings of the queried classes (from the text cache `text`, else computed now)."""
    clip, tokenizer = load_clip(cfg.clip)
    clip.to(env.device)
    text_all = text_embeddings(cfg, split.names, text, clip, tokenizer, env.device)
    queries = text_all[list(split.queries)]  # (K, C)
    return CascadeCLIP(clip, cfg.model).to(env.device), queries  # holds clip.visual only


class StepLog:
    """The progress bar and DIR/log.jsonl: every `interval` steps, the mean loss over them, the
    lr, the run's training seconds so far (a resumed run's earlier ones included) and steps/s."""

    def __init__(self, path: Path, interval: int, iters: int, progress: Progress, setting: str, env: DistEnv):
        self.path, self.interval, self.iters, self.progress, self.env = path, interval, iters, progress, env
        self.bar = tqdm(total=iters, initial=progress.step, disable=not env.is_main, dynamic_ncols=True,
                        desc=setting)
        self.t_start = self.t_log = time.time()
        self.steps = 0  # since the last record
        self.loss_sum = torch.zeros((), device=env.device)  # summed on the device: no sync per step

    def elapsed(self) -> float:
        return self.progress.elapsed_before + time.time() - self.t_start

    def add(self, loss: torch.Tensor, lr: float) -> None:
        """Count one finished step (`progress.step` already advanced) with its mean loss."""
        step = self.progress.step
        self.loss_sum += loss
        self.steps += 1
        self.bar.update(1)
        if step % self.interval != 0 and step != self.iters:
            return
        now = time.time()
        it_s = self.steps / max(now - self.t_log, 1e-9)
        record = {
            "step": step,
            "loss": (self.loss_sum / self.steps).item(),
            "lr": lr,
            "time": round(self.progress.elapsed_before + now - self.t_start, 3),
            "it_s": round(it_s, 3),
        }
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", it_s=f"{it_s:.2f}")
        if self.env.is_main:
            log_line(self.path, record)
        self.t_log, self.steps = now, 0
        self.loss_sum.zero_()

    def close(self) -> None:
        self.bar.close()
