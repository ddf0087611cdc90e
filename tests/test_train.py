"""Training: lr schedule, masks, pseudo-labels, checkpoints, resume, non-finite loss, CLI.

Everything runs the tiny CLIP of conftest on 32x32 images for a few steps. The helpers
here (`make_tiny_dataset`, `tiny_config`, `write_config`) are imported by the evaluation
and prediction tests as well.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cascade_clip.config import (
    AugmentConfig,
    ClipConfig,
    Config,
    DatasetConfig,
    DecoderConfig,
    EvalConfig,
    ModelConfig,
    SelfTrainConfig,
    TrainConfig,
    config_to_dict,
)

TINY_CLASSES = ["sky", "grass", "road", "cat", "dog"]
TINY_UNSEEN = ["road", "dog"]
COLOURS = np.array([[90, 150, 240], [40, 180, 60], [120, 120, 120], [230, 140, 40], [150, 80, 40]], np.uint8)


def make_tiny_dataset(root: Path, n_train: int = 6, n_val: int = 3, size: int = 32, seed: int = 0) -> Path:
    """A dataset in the common on-disk format: a stuff background (top/bottom) and a
    square thing, each class painted in its own colour with noise; labels match."""
    rng = np.random.default_rng(seed)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        ids = []
        for i in range(n):
            label = np.zeros((size, size), np.uint8)
            label[size // 2 :] = rng.choice([1, 2])
            y, x = rng.integers(0, size // 2, 2)
            label[y : y + size // 3, x : x + size // 3] = rng.choice([3, 4])
            label[0, :4] = 255
            image = COLOURS[np.where(label == 255, 0, label)].astype(np.int16)
            image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
            image_id = f"{split}{i:03d}"
            Image.fromarray(image).save(root / "images" / split / f"{image_id}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{image_id}.png")
            ids.append(image_id)
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    meta = {"name": "tiny", "classes": TINY_CLASSES, "image_suffix": ".png", "label_suffix": ".png"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def tiny_config(root: Path, clip_config: dict, **train: object) -> Config:
    """A config for the tiny CLIP at 32x32: 2 stages over blocks 2..4, dropout 0."""
    train_cfg = dict(
        iters=6,
        batch_size=2,
        lr=1e-3,
        warmup_iters=2,
        log_interval=1,
        checkpoint_interval=2,
        num_workers=0,
        augment=AugmentConfig(scale=(64, 32), ratio_range=(0.75, 1.5), crop_size=32, cat_max_ratio=1.0),
    )
    train_cfg.update(train)
    return Config(
        experiment="tiny",
        clip=ClipConfig(
            model="tiny",
            pretrained="random",
            model_config=clip_config,
            image_size=32,
            templates="official-single",
        ),
        model=ModelConfig(
            stages=[[2, 3], [4]],
            decoder=DecoderConfig(layers=2, heads=2, ffn_dim=64, dropout=0.0),
            vpt_tokens=3,
        ),
        dataset=DatasetConfig(name="tiny", root=str(root), unseen=list(TINY_UNSEEN)),
        train=TrainConfig(**train_cfg),
        self_train=SelfTrainConfig(iters=4, start_fraction=0.5),
        evaluate=EvalConfig(crop_size=32, stride=24, short_side=40, num_visualize=2),
    )


def write_config(cfg: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def trainable(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a small shared machine: one intra-op thread is faster (no spinning
    OpenMP barriers). Restored after the module, so other tests keep torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


# --- pieces --------------------------------------------------------------------------------


def test_learning_rate_warmup_then_poly():
    from cascade_clip.train.step import learning_rate

    lrs = [learning_rate(s, 1e-3, 100, 10, 0.9, 1e-6) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 * (1 - 0 / 100) ** 0.9 / 10 + 1e-6 / 10, rel=1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # warm-up rises
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # then poly decays
    assert learning_rate(100, 1e-3, 100, 10, 0.9, 1e-6) == pytest.approx(1e-6)


def test_count_masks_and_lut():
    from cascade_clip.classes import ClassSplit
    from cascade_clip.train.step import count_masks

    target = torch.tensor([[[0, 0], [1, 255]], [[2, 2], [255, 255]]])
    assert count_masks(target, 3).item() == 3
    assert count_masks(target, 2).item() == 2  # class 2 is not a query
    split = ClassSplit(("a", "b", "c", "d"), seen=(0, 2), unseen=(1, 3), queries=(0, 2))
    lut = split.target_lut()
    assert lut[torch.tensor([0, 1, 2, 3, 254, 255])].tolist() == [0, 255, 1, 255, 254, 255]


def test_pseudo_label_takes_argmax_over_unseen_only():
    from cascade_clip.train.step import pseudo_label

    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0] = 10.0  # a seen class scores highest everywhere
    logits[0, 2, 0] = 1.0  # unseen query 2 wins the top row, query 1 the bottom row
    logits[0, 1, 1] = 1.0
    target = torch.tensor([[[254, 0], [254, 255]]])
    out = pseudo_label(logits, target, unseen_queries=[1, 2])
    assert out.tolist() == [[[2, 0], [1, 255]]]


def test_subsample_labels_takes_cell_centres():
    from cascade_clip.train.step import subsample_labels

    labels = torch.arange(30).view(1, 5, 6)
    assert subsample_labels(labels, 1) is labels
    assert subsample_labels(labels, 2).tolist() == [[[7, 9, 11], [19, 21, 23]]]
    assert subsample_labels(labels, 3).tolist() == [[[7, 10], [25, 28]]]


def test_sampler_shards_one_stream_and_resumes():
    from cascade_clip.distributed import ShardedInfiniteSampler

    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    whole = take(ShardedInfiniteSampler(5, seed=3), 12)
    r0 = take(ShardedInfiniteSampler(5, 0, 2, seed=3), 6)
    r1 = take(ShardedInfiniteSampler(5, 1, 2, seed=3), 6)
    assert sorted(r0 + r1) == sorted(whole)
    assert [i for _, i in whole[:5]] != list(range(5)) or [i for _, i in whole[5:10]] != list(range(5))
    assert sorted(i for _, i in whole[:5]) == list(range(5))  # each epoch is a permutation
    assert take(ShardedInfiniteSampler(5, seed=3, start=7), 5) == whole[7:12]


def test_checkpoint_atomic_and_config_check(tmp_path, tiny_root, tiny_clip_config):
    from cascade_clip.checkpoint import (
        CHECKPOINT_VERSION,
        check_model_config,
        load_checkpoint,
        save_checkpoint,
    )

    cfg = tiny_config(tiny_root, tiny_clip_config)
    config = config_to_dict(cfg)
    state = {"version": CHECKPOINT_VERSION, "model": {"w": torch.ones(2)}, "config": config, "step": 3}
    path = save_checkpoint(state, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    loaded = load_checkpoint(path)
    check_model_config(loaded, cfg, path)
    other = tiny_config(tiny_root, tiny_clip_config)
    other.model.stages = [[4]]
    other.model.seen_calibration = 0.3  # inference-only: not a difference
    with pytest.raises(ValueError, match=r"model\.stages: checkpoint \[\[2, 3\], \[4\]\], config \[\[4\]\]"):
        check_model_config(loaded, other, path)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


# --- runs ----------------------------------------------------------------------------------


class Interrupt(RuntimeError):
    pass


def test_resume_equals_uninterrupted_run(tmp_path, tiny_root, tiny_clip_config):
    """vpt (online encoder, augmentation, prompt dropout) killed after step 5 and resumed
    from the step-4 checkpoint ends with exactly the parameters of an uninterrupted run."""
    from cascade_clip.train import train

    cfg = tiny_config(tiny_root, tiny_clip_config)
    cfg.model.encoder_mode = "vpt"
    full = train(cfg, tmp_path / "full")

    def crash(step: int) -> None:
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "cut", on_step=crash)
    assert torch.load(tmp_path / "cut" / "ckpt_last.pt", weights_only=True)["step"] == 4
    resumed = train(cfg, tmp_path / "cut", resume=True)
    a, b = trainable(full), trainable(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "lr", "time", "it_s"} <= set(log[-1])
    assert (tmp_path / "full" / "ckpt_half.pt").is_file()
    assert torch.load(tmp_path / "full" / "ckpt_half.pt", weights_only=True)["step"] == 3


def test_self_training_from_half_checkpoint(tmp_path, tiny_root, tiny_clip_config):
    """Inductive run -> ckpt_half -> transductive self-training with all classes as queries."""
    from cascade_clip.train import train

    cfg = tiny_config(tiny_root, tiny_clip_config, iters=4)
    train(cfg, tmp_path / "ind")
    # loss on every 2nd label pixel: pseudo-labels are made at the subsampled size too
    st = tiny_config(tiny_root, tiny_clip_config, setting="transductive", iters=4, loss_stride=2)
    final = train(st, tmp_path / "st", init=tmp_path / "ind" / "ckpt_half.pt")
    state = torch.load(final, weights_only=True)
    assert state["setting"] == "transductive" and state["step"] == st.self_train.iters
    assert state["unseen"] == TINY_UNSEEN
    init = trainable(tmp_path / "ind" / "ckpt_half.pt")
    assert any(not torch.equal(init[k], v) for k, v in state["model"].items())


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, tiny_root, tiny_clip_config, monkeypatch):
    import cascade_clip.train.loop as train_mod

    cfg = tiny_config(tiny_root, tiny_clip_config)
    real = train_mod.sigmoid_focal_dice_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_mod, "sigmoid_focal_dice_loss", poisoned)
    with pytest.raises(
        train_mod.NonFiniteLossError, match=r"at step 3; stopped \(.*ckpt_last.pt holds step 2\)"
    ):
        train_mod.train(cfg, tmp_path / "run")
    good = torch.load(tmp_path / "run" / "ckpt_last.pt", weights_only=True)
    assert good["step"] == 2
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())


def test_resume_with_another_model_config_starts_over_and_init_refuses_it(
    tmp_path, tiny_root, tiny_clip_config, capsys
):
    """--resume never loads a checkpoint of another model config: the run starts over (what
    the workflow wants when a config edit reruns the rule); --init refuses it by name."""
    from cascade_clip.train import train

    cfg = tiny_config(tiny_root, tiny_clip_config, iters=2)
    first = tmp_path / "first.pt"
    first.write_bytes(train(cfg, tmp_path / "run").read_bytes())
    cfg.model.decoder.heads = 4
    train(cfg, tmp_path / "run", resume=True)
    assert "model.decoder.heads: 2 -> 4); starting this run over" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert not [r for r in log if r.get("event") == "resume"]
    with pytest.raises(ValueError, match=r"model\.decoder\.heads: checkpoint 2, config 4"):
        train(cfg, tmp_path / "other", init=first)


def test_train_cli(tmp_path, tiny_root, tiny_clip_config, capsys):
    from cascade_clip.cli import main

    config = write_config(tiny_config(tiny_root, tiny_clip_config), tmp_path / "c.yaml")
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--out", str(out), "--set", "train.iters=2", "--resume"]
    assert main(args) == 0  # --resume without a checkpoint starts afresh (the workflow always passes it)
    assert {"model_final.pt", "ckpt_last.pt", "ckpt_half.pt", "log.jsonl", "config.yaml"} <= {
        p.name for p in out.iterdir()
    }
    log = (out / "log.jsonl").read_text()
    assert main(args) == 0  # a finished run resumed: nothing to do, nothing lost
    assert (out / "log.jsonl").read_text().startswith(log)
    assert torch.load(out / "model_final.pt", weights_only=True)["step"] == 2
    assert main(["train", "--config", str(config), "--out", str(out), "--init", str(tmp_path / "no.pt")]) == 2
    assert "no.pt: checkpoint not found" in capsys.readouterr().err


def test_train_from_feature_cache(tmp_path, tiny_root, tiny_clip_config):
    """The frozen-cache path: its first step's loss equals the online frozen path's (same
    views, fp16 features), and a model tapping a subset of the cached blocks reads it too."""
    from cascade_clip.cache import join_shards, write_shard
    from cascade_clip.model import CascadeCLIP, load_clip
    from cascade_clip.train import train

    cfg = tiny_config(tiny_root, tiny_clip_config, iters=1)
    torch.manual_seed(cfg.seed)  # the random tiny CLIP that train() builds with this seed
    model = CascadeCLIP(load_clip(cfg.clip)[0], cfg.model).eval()
    shard = write_shard(
        cfg, "train", (0, 1), tmp_path / "s.h5", model=model, progress=False, log=lambda m: None
    )
    cache = join_shards([shard], tmp_path / "train.h5")
    train(cfg, tmp_path / "online")
    train(cfg, tmp_path / "cached", cache=cache)

    def first_loss(run: str) -> float:
        return json.loads((tmp_path / run / "log.jsonl").read_text().splitlines()[0])["loss"]

    assert first_loss("cached") == pytest.approx(first_loss("online"), rel=1e-3)
    single = tiny_config(tiny_root, tiny_clip_config, iters=1)
    single.model.stages = [[4]]  # the single-decoder baseline on the last block
    train(single, tmp_path / "single", cache=cache)
    assert (tmp_path / "single" / "model_final.pt").is_file()


def test_resume_on_more_ranks_gives_new_ranks_their_own_seeded_streams():
    """A world that grew on resume: saved ranks restore their streams; a new rank gets a
    fresh stream from (seed, rank, step), never a copy of rank 0's."""
    from cascade_clip.checkpoint import restore_rank_rng, rng_state

    torch.manual_seed(123)
    saved = [rng_state()]
    expected_rank0 = torch.rand(3)

    def draws(rank: int) -> tuple[bool, torch.Tensor]:
        torch.manual_seed(999)  # whatever the process had before
        restored = restore_rank_rng(saved, rank, seed=0, step=40)
        return restored, torch.rand(3)

    assert draws(0)[0] and torch.equal(draws(0)[1], expected_rank0)
    restored1, rank1 = draws(1)
    restored2, rank2 = draws(2)
    assert not restored1 and not restored2
    assert not torch.equal(rank1, expected_rank0) and not torch.equal(rank1, rank2)
    assert torch.equal(draws(1)[1], rank1)  # deterministic


def test_loader_workers_auto_takes_the_process_share_of_the_job_cores(monkeypatch):
    from cascade_clip.distributed import loader_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert loader_workers("auto") == 4  # capped at 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers("auto") == 3  # 16 job threads over 4 processes: 4 cores, one drives
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert loader_workers("auto") == 0  # a 2-thread job of 4 processes: no spare core
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers("auto") == 4 and loader_workers(2) == 2


def test_compile_falls_back_to_eager_and_trains_the_same(
    tmp_path, tiny_root, tiny_clip_config, monkeypatch, capsys
):
    """train.compile: a compiled step that cannot run (here: a backend that raises) warns
    once and the run goes on eagerly, to the very weights of an uncompiled run."""
    from cascade_clip.train import train

    calls = []

    def broken_compile(module, **kwargs):
        def run(*args, **kw):
            calls.append(kwargs["mode"])
            raise RuntimeError("no backend for this graph")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = train(tiny_config(tiny_root, tiny_clip_config, iters=3), tmp_path / "eager")
    cfg = tiny_config(tiny_root, tiny_clip_config, iters=3, compile="reduce-overhead")
    fallback = train(cfg, tmp_path / "compiled")
    assert calls == ["reduce-overhead"]  # tried once, then eager
    out = capsys.readouterr().out
    assert "train.compile=reduce-overhead: compiled step failed (RuntimeError: no backend" in out
    a, b = trainable(eager), trainable(fallback)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_compiled_step_matches_eager(tmp_path, tiny_root, tiny_clip_config):
    """torch.compile for real (inductor on the CPU here; CUDA graphs on a GPU with
    reduce-overhead): the same losses as the eager step."""
    import json

    from cascade_clip.train import train

    def losses(mode: str) -> list[float]:
        out = tmp_path / mode
        train(tiny_config(tiny_root, tiny_clip_config, iters=3, compile=mode), out)
        records = map(json.loads, (out / "log.jsonl").read_text().splitlines())
        return [r["loss"] for r in records if "loss" in r]

    assert losses("default") == pytest.approx(losses("none"), rel=1e-4)


def test_train_seed_changes_the_run_not_the_data(tmp_path, tiny_root, tiny_clip_config):
    """train.seed reseeds the run (another head init): different weights; unset, the
    experiment seed decides, so train.seed equal to it is the same run."""
    from cascade_clip.train import train

    base = train(tiny_config(tiny_root, tiny_clip_config, iters=2), tmp_path / "base")
    same = train(tiny_config(tiny_root, tiny_clip_config, iters=2, seed=0), tmp_path / "same")
    other = train(tiny_config(tiny_root, tiny_clip_config, iters=2, seed=1), tmp_path / "other")
    a, b, c = trainable(base), trainable(same), trainable(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_continues_the_same_recipe_and_restarts_a_changed_one(
    tmp_path, tiny_root, tiny_clip_config, capsys
):
    """--resume after a crash continues; after a config edit that changes what the run
    trains (the workflow reruns the rule), the run starts over instead of resuming the old
    schedule; a runtime-only change (loader workers, log interval) still resumes."""
    from cascade_clip.train import train

    def crash(step: int) -> None:
        if step == 5:
            raise Interrupt

    def events(run) -> list:
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

    cfg = tiny_config(tiny_root, tiny_clip_config)
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "a", on_step=crash)
    train(tiny_config(tiny_root, tiny_clip_config, log_interval=2), tmp_path / "a", resume=True)
    assert [r["step"] for r in events(tmp_path / "a") if r.get("event") == "resume"] == [4]

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "b", on_step=crash)
    changed = tiny_config(tiny_root, tiny_clip_config, lr=5e-4)
    train(changed, tmp_path / "b", resume=True)
    out = capsys.readouterr().out
    assert "written for another config (train.lr: 0.001 -> 0.0005); starting this run over" in out
    log = events(tmp_path / "b")
    assert not [r for r in log if r.get("event") == "resume"]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    fresh = train(changed, tmp_path / "c")
    a, b = trainable(tmp_path / "b" / "model_final.pt"), trainable(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the global batch on any number of processes (issue 32) ----------------------------------


def test_batch_plan_keeps_the_real_configs_global_batch_on_1_2_4_8_gpus():
    from cascade_clip.config import ConfigError, batch_plan, load_config

    root = Path(__file__).resolve().parents[1] / "config"
    for name in ("coco_stuff", "voc", "context"):
        cfg = load_config(root / f"{name}.yaml")
        st_global = 32 if name == "voc" else 16  # the release self-trains VOC with 4 x 8
        for gpus, (micro, accum) in {1: (4, 4), 2: (4, 2), 4: (4, 1), 8: (2, 1)}.items():
            plan = batch_plan(cfg, "inductive", gpus)
            assert (plan.global_batch, plan.micro_batch, plan.accumulation) == (16, micro, accum), name
            st = batch_plan(cfg, "transductive", gpus)
            assert st.global_batch == st_global == st.processes * st.micro_batch * st.accumulation
        assert batch_plan(cfg, "inductive", 4).accumulation == 1  # the release's 4 GPUs x 4: no accumulation
    voc = load_config(root / "voc.yaml")
    assert batch_plan(voc, "transductive", 4).micro_batch == 8
    assert batch_plan(voc, "transductive", 1).accumulation == 4
    with pytest.raises(ConfigError, match=r"train\.global_batch 16 does not divide over 3 training"):
        batch_plan(voc, "inductive", 3)
    with pytest.raises(ConfigError, match=r"config/voc\.yaml: train\.global_batch 16 does not divide over 3"):
        load_config(root / "voc.yaml", {"workflow.train_gpus": 3})
    with pytest.raises(ConfigError, match=r"16 images each, not a multiple of train\.batch_size 3"):
        load_config(root / "voc.yaml", {"train.batch_size": 3, "workflow.train_gpus": 1})
    demo = load_config(root / "config.yaml")  # no global batch: batch_size per process, as before
    assert batch_plan(demo, "inductive", 2).global_batch == 2 * demo.train.batch_size


@pytest.mark.parametrize("setting", ["inductive", "transductive"])
def test_accumulating_passes_makes_the_one_big_batch_update(tmp_path, tiny_root, tiny_clip_config, setting):
    """One process: 4 passes of one image per step equal one pass of 4 images (the same
    images, the loss normalised by the step's present image-class pairs); self-training's
    pseudo-labels come from the same weights in every pass."""
    from cascade_clip.train import train

    runs = {}
    for name, kw in {"big": {"batch_size": 4}, "accum": {"batch_size": 1, "global_batch": 4}}.items():
        cfg = tiny_config(tiny_root, tiny_clip_config, iters=3, checkpoint_interval=10, **kw)
        cfg.train.setting = setting
        cfg.self_train.iters = 3
        runs[name] = trainable(train(cfg, tmp_path / name, device="cpu"))
    moved = [k for k in runs["big"] if not torch.equal(runs["big"][k], runs["accum"][k])]
    assert moved, "bit-identical: the accumulation path did not run"
    for k, x in runs["big"].items():
        y = runs["accum"][k]
        if k.endswith("attn.in_proj_bias"):  # the key bias: rounding noise only (test_distributed)
            x, y = x.view(3, -1)[[0, 2]], y.view(3, -1)[[0, 2]]
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=k)
