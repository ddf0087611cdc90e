"""`train()`: one training run, read top to bottom (the steps are in cascade_clip.train)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from cascade_clip.cache import weights_digest
from cascade_clip.checkpoint import check_checkpoint, load_checkpoint
from cascade_clip.classes import SETTINGS, ClassSplit, class_split
from cascade_clip.config import Config, batch_plan
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
    # one step: global batch = processes x micro-batch x accumulation (config.batch_plan)
    plan = batch_plan(cfg, setting, env.world_size)
    if len(dataset) < plan.micro_batch:
        raise InputError(f"{cache or cfg.dataset.root}: {len(dataset)} items, fewer than one batch")
    if env.is_main and plan.accumulation > 1:
        print(f"{files.dir}: {plan.describe()}")

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
    batches = iter(make_loader(dataset, cfg, env, consumed=progress.consumed, batch_size=plan.micro_batch))

    # 7. the loop: per accumulation step, batch -> logits -> (self-training: pseudo-labels) ->
    #    loss -> backward; then one optimizer step
    lut, unseen_queries = split.target_lut().to(env.device), split.unseen_queries
    amp = cfg.train.amp and env.device.type == "cuda"
    log = StepLog(files.log, cfg.train.log_interval, iters, progress, setting, env)
    while progress.step < iters:
        lr = learning_rate(
            progress.step, cfg.train.lr, iters, cfg.train.warmup_iters, cfg.train.poly_power, cfg.train.min_lr
        )
        for group in optimizer.param_groups:
            group["lr"] = lr

        optimizer.zero_grad(set_to_none=True)
        step_loss, step_masks = torch.zeros((), device=env.device), torch.zeros((), device=env.device)
        for micro in range(plan.accumulation):
            last = micro == plan.accumulation - 1
            # DDP averages gradients over ranks in the last pass's backward only
            sync = contextlib.nullcontext() if last or not env.distributed else step_module.no_sync()
            with sync:
                batch = next(batches)
                labels = subsample_labels(batch["label"], cfg.train.loss_stride)  # (B, H, W) or every n-th
                target = lut[labels.to(env.device, non_blocking=True).long()]  # query ids
                with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = step_fn(queries, **model_inputs(batch, env.device, tap_rows))  # (B, K, h, w)
                logits = logits.float()
                if setting == "transductive":
                    target = pseudo_label(logits, target, unseen_queries)
                masks = count_masks(target, len(split.queries))
                # The loss's normaliser M is the number of present (image, class) pairs averaged
                # over ranks (the release). One pass: known now. Several: only after the last
                # pass, so each pass's loss is left unnormalised (M = 1) and the summed
                # gradients are divided by accumulation x M below; the same update.
                num_masks = all_reduce_mean(masks) if plan.accumulation == 1 else 1.0
                loss = sigmoid_focal_dice_loss(
                    logits,
                    target,
                    ignore_index=IGNORE_INDEX,
                    ignore_as_negative=cfg.train.ignore_as_negative,
                    num_masks=num_masks,
                )
                loss.backward()
            step_loss += loss.detach()
            step_masks += masks
        if plan.accumulation > 1:
            scale = 1.0 / (plan.accumulation * all_reduce_mean(step_masks / plan.accumulation).clamp(min=1.0))
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            step_loss = step_loss * scale
        mean_loss = all_reduce_mean(step_loss)  # NaN on any rank makes it NaN on all
        if not torch.isfinite(mean_loss):
            last_saved = progress.last_saved
            kept = "no checkpoint yet" if last_saved is None else f"{files.last} holds step {last_saved}"
            raise NonFiniteLossError(
                f"{files.dir}: loss is {mean_loss.item()} at step {progress.step + 1}; stopped ({kept})"
            )

        optimizer.step()
        progress.step += 1
        progress.consumed += plan.global_batch
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
