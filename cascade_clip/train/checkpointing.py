"""A run folder's files and how a run saves, resumes or starts over.

Files written by rank 0 in the run directory DIR:

  DIR/config.yaml     the effective config
  DIR/log.jsonl       one JSON object per logged step: step, loss, lr, time, it_s (and one
                      record per resume)
  DIR/ckpt_last.pt    resumable checkpoint (every train.checkpoint_interval steps and at the end)
  DIR/ckpt_half.pt    weights at iters * self_train.start_fraction (self-training starts here)
  DIR/model_final.pt  final weights

A resumed run continues the global sample stream, the optimiser and every rank's random
generators where ckpt_last.pt left them. A folder written for another recipe, or from other
inputs (cascade_clip.train.provenance: the CLIP, text embeddings, --init weights, feature
cache, dataset), starts over, also when that run had finished. Rank 0 decides; the other
ranks follow it or the run stops.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from cascade_clip.checkpoint import (
    CHECKPOINT_VERSION,
    check_checkpoint,
    load_checkpoint,
    restore_rank_rng,
    rng_state,
    save_checkpoint,
)
from cascade_clip.classes import ClassSplit
from cascade_clip.config import Config, config_to_dict
from cascade_clip.distributed import DistEnv, all_gather_object, broadcast_object
from cascade_clip.errors import CascadeClipError, InputError
from cascade_clip.model import CascadeCLIP
from cascade_clip.train.inputs import training_seed
from cascade_clip.train.provenance import input_changes


@dataclass(frozen=True)
class RunFiles:
    """The files of one run folder."""

    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def log(self) -> Path:
        return self.dir / "log.jsonl"

    @property
    def last(self) -> Path:
        return self.dir / "ckpt_last.pt"

    @property
    def half(self) -> Path:
        return self.dir / "ckpt_half.pt"

    @property
    def final(self) -> Path:
        return self.dir / "model_final.pt"


@dataclass
class Progress:
    """Where a run stands: optimisation steps done, items of the global sample stream consumed,
    training seconds before this process started, and the step ckpt_last.pt holds."""

    step: int = 0
    consumed: int = 0
    elapsed_before: float = 0.0
    last_saved: int | None = None


# train-section keys that change how a run goes, not what it trains: a run resumes across them
RUNTIME_KEYS = ("num_workers", "prefetch_factor", "log_interval", "checkpoint_interval", "compile")
# Keys that name where an input lies, not what it holds (the inputs' digests hold that): the
# data's folder, the CLIP's weights and model-config files.
LOCATION_KEYS = {"dataset": ("root",), "clip": ("pretrained", "model_config")}


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the config a checkpoint was written with and this one, in what a
    run trains (seed, CLIP, model, data, schedule): "train.iters: 1000 -> 1200". The
    self-training schedule (`self_train.*`) belongs to the transductive run; of it, an
    inductive run depends only on `start_fraction` (where it writes ckpt_half.pt)."""
    transductive = current.get("train", {}).get("setting") == "transductive"

    def recipe(config: dict[str, Any]) -> dict[str, Any]:
        out = {"seed": config.get("seed")}
        for section in ("clip", "dataset"):
            dropped = LOCATION_KEYS[section]
            out[section] = {k: v for k, v in config.get(section, {}).items() if k not in dropped}
        out["train"] = {k: v for k, v in config.get("train", {}).items() if k not in RUNTIME_KEYS}
        out["model"] = {k: v for k, v in config.get("model", {}).items() if k != "seen_calibration"}
        self_train = config.get("self_train", {})
        if not transductive:
            self_train = {"start_fraction": self_train.get("start_fraction")}
        out["self_train"] = self_train
        return out

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


def checkpoint_state(
    model: CascadeCLIP,
    cfg: Config,
    split: ClassSplit,
    setting: str,
    step: int,
    elapsed: float,
    clip_weights: str,
    record: dict[str, Any],
) -> dict[str, Any]:
    """The weights-only part of a checkpoint (what evaluation and --init need), with the
    run's `record` of what it consumed (`inputs`, `dataset_files`)."""
    return {
        **record,
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


def resumable_state(
    files: RunFiles,
    cfg: Config,
    env: DistEnv,
    resume: bool,
    consumed: Callable[[dict[str, Any] | None], dict[str, Any]],
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(DIR/ckpt_last.pt's state to resume from, or None to start; this run's record).

    Rank 0 decides: with `resume`, it continues ckpt_last.pt when that was written for this
    recipe and from these inputs (`consumed(saved)` is this run's record, asked of rank 0
    only); else the run starts over, with one line saying what changed (the workflow reruns a
    rule after a config edit or when an input was remade). The other ranks follow rank 0's
    decision, each reading ckpt_last.pt itself; one that cannot find rank 0's step there stops
    every rank with one error before anything is written.
    """
    state, record, decision = None, None, {"step": None, "error": None}
    if env.is_main:
        try:
            saved = load_checkpoint(files.last) if resume and files.last.is_file() else None
            record = consumed(saved)
            why = "" if saved is None else _not_resumable(saved, cfg, record)
            if why:
                print(f"{files.last}: written for {why}; starting this run over")
            state = None if why else saved
        except Exception as err:
            decision["error"] = f"{type(err).__name__}: {err}"
            broadcast_object(decision)  # the other ranks stop too, instead of waiting
            raise
        decision["step"] = None if state is None else int(state["step"])
    decision = broadcast_object(decision)
    if decision["error"] is not None:
        raise InputError(f"{files.last}: rank 0 could not decide whether to resume ({decision['error']})")
    if env.distributed:
        problem = None
        if not env.is_main and decision["step"] is not None:
            state, problem = _follow(files.last, decision["step"], env.rank)
        problems = [p for p in all_gather_object(problem) if p]
        if problems:
            raise InputError(
                f"{files.last}: rank 0 resumes from step {decision['step']}, but {'; '.join(problems)}; "
                "every rank must see the run folder alike (one shared file system)"
            )
    return state, record


def _not_resumable(saved: dict[str, Any], cfg: Config, record: dict[str, Any]) -> str:
    """Why a run must not continue `saved` ("another config (...) and other inputs (...)"), or ""."""
    why = []
    changed = recipe_changes(saved["config"], config_to_dict(cfg))
    if changed:
        why.append(f"another config ({'; '.join(changed[:3])})")
    inputs = input_changes(saved.get("inputs"), record["inputs"])
    if inputs:
        why.append(f"other inputs ({'; '.join(inputs)})")
    return " and ".join(why)


def _follow(path: Path, step: int, rank: int) -> tuple[dict[str, Any] | None, str | None]:
    """A rank other than 0: (its own read of ckpt_last.pt, None), or (None, why it cannot follow)."""
    try:
        state = load_checkpoint(path)
    except CascadeClipError as err:
        return None, f"rank {rank} cannot read it ({err})"
    if int(state["step"]) != step:
        return None, f"rank {rank} finds step {state['step']} in it"
    return state, None


class Checkpointer:
    """Saves this run's checkpoints and restores a resumed run's state from ckpt_last.pt.

    Every rank calls `save` (a full checkpoint gathers every rank's random generators); rank 0
    writes the file.
    """

    def __init__(
        self,
        files: RunFiles,
        model: CascadeCLIP,
        optimizer: torch.optim.Optimizer,
        cfg: Config,
        split: ClassSplit,
        setting: str,
        clip_weights: str,
        record: dict[str, Any] | None,
        env: DistEnv,
    ):
        self.files, self.model, self.optimizer = files, model, optimizer
        self.cfg, self.split, self.setting = cfg, split, setting
        self.clip_weights, self.record, self.env = clip_weights, record or {}, env

    def start(self) -> Progress:
        """A fresh run: step 0, an empty log."""
        if self.env.is_main:
            self.files.log.unlink(missing_ok=True)
        return Progress()

    def resume(self, state: dict[str, Any], half_step: int) -> Progress:
        """Restore ckpt_last.pt's `state`: weights, optimiser, stream position and generators."""
        path, env = self.files.last, self.env
        check_checkpoint(state, self.cfg, path, self.split.names, self.split.unseen_names)
        if state["setting"] != self.setting:
            raise InputError(f"{path}: written by a {state['setting']} run, this run is {self.setting}")
        self.model.load_trainable_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        progress = Progress(
            step=step,
            consumed=int(state["sampler"]["consumed"]),  # holds even if the world size changed
            elapsed_before=float(state.get("elapsed", 0.0)),
            last_saved=step,
        )
        if step >= half_step and not self.files.half.is_file():
            # Its weights cannot be recomputed from a later step: never stand in the final ones.
            raise InputError(
                f"{self.files.half}: missing, and {path} is at step {step}, past the half-way step "
                f"{half_step} it held; delete {path} to train this run again from the start"
            )
        saved_world = len(state["rng"])
        restore_rank_rng(state["rng"], env.rank, training_seed(self.cfg), step)
        if env.is_main:
            if saved_world != env.world_size:
                print(
                    f"{path}: written by {saved_world} process(es), resumed on {env.world_size}: "
                    "the sample stream continues; ranks without a saved state get fresh seeded generators"
                )
            truncate_log(self.files.log, step)
            record = {"step": step, "event": "resume", "world_size": env.world_size}
            log_line(self.files.log, {**record, "saved_world_size": saved_world})
        return progress

    def save(self, path: Path, progress: Progress, full: bool, elapsed: float) -> None:
        """Weights (and, when `full`, everything a resume needs) at `progress.step`."""
        rngs = all_gather_object(rng_state()) if full else None  # every rank takes part
        if full:
            progress.last_saved = progress.step
        if not self.env.is_main:
            return
        state = checkpoint_state(
            self.model, self.cfg, self.split, self.setting, progress.step, elapsed, self.clip_weights,
            self.record,
        )
        if full:
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = {"name": "warmup_poly", "step": progress.step}
            state["sampler"] = {"consumed": progress.consumed, "seed": training_seed(self.cfg)}
            state["rng"] = rngs
        save_checkpoint(state, path)


def write_run_config(files: RunFiles, cfg: Config) -> None:
    files.dir.mkdir(parents=True, exist_ok=True)
    files.config.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
