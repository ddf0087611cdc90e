"""A rerun tells the truth: `train --resume` (what the workflow always passes) continues a run
only when everything it consumed is what the run was started with, and starts over, with one
line saying what changed, when not. A finished run whose inputs changed retrains; moving the
data and editing settings that do not change what a run trains never restart it.

Each test here was written against the code before issue 24 and failed there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_train import (
    Interrupt,
    make_tiny_dataset,
    one_thread,  # noqa: F401  (autouse: one intra-op thread)
    tiny_config,
    trainable,
)

from cascade_clip.train import train


def crash_at(step: int):
    def on_step(done: int) -> None:
        if done == step:
            raise Interrupt

    return on_step


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def resumed_at(run: Path) -> list[int]:
    return [r["step"] for r in events(run) if r.get("event") == "resume"]


def same(a: Path, b: Path) -> bool:
    x, y = trainable(a), trainable(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def start_over_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if "starting this run over" in line]


@pytest.fixture
def data(tmp_path) -> Path:
    return make_tiny_dataset(tmp_path / "data")


def test_finished_run_retrains_when_its_dataset_changes(tmp_path, data, tiny_clip_config, capsys):
    """Regenerated images and labels under the same ids and config: the finished run trains
    again (same weights as a fresh run on the new data), it does not hand back the old ones."""
    cfg = tiny_config(data, tiny_clip_config, iters=2)
    old = tmp_path / "old.pt"
    shutil.copy(train(cfg, tmp_path / "run"), old)
    make_tiny_dataset(data, seed=1)  # the same ids, other pictures
    (tmp_path / "run" / "model_final.pt").unlink()  # what Snakemake does before it reruns the rule
    capsys.readouterr()
    final = train(cfg, tmp_path / "run", resume=True)
    lines = start_over_lines(capsys)
    assert len(lines) == 1 and "dataset" in lines[0], lines
    assert not same(final, old)
    assert same(final, train(cfg, tmp_path / "fresh"))
    assert not resumed_at(tmp_path / "run")


def test_changed_text_embeddings_start_the_run_over(tmp_path, data, tiny_clip_config, capsys):
    from cascade_clip.text_cache import compute_text_embeddings, write_text_embeddings

    cfg = tiny_config(data, tiny_clip_config, iters=4)
    torch.manual_seed(cfg.seed)  # the random tiny CLIP train() builds
    emb, names = compute_text_embeddings(cfg, device="cpu")
    text = write_text_embeddings(tmp_path / "text.h5", cfg, emb, names)
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "run", text=text, on_step=crash_at(3))
    other = torch.nn.functional.normalize(emb + 0.3 * torch.randn_like(emb), dim=-1)
    write_text_embeddings(text, cfg, other, names)
    capsys.readouterr()
    train(cfg, tmp_path / "run", text=text, resume=True)
    lines = start_over_lines(capsys)
    assert len(lines) == 1 and "text" in lines[0], lines
    assert not resumed_at(tmp_path / "run")


def test_changed_init_starts_self_training_over(tmp_path, data, tiny_clip_config, capsys):
    """Self-training whose --init (the main run's ckpt_half.pt) was rewritten by a retrained
    main run trains again from the new weights."""
    main = tiny_config(data, tiny_clip_config, iters=4)
    train(main, tmp_path / "main")
    init = tmp_path / "main" / "ckpt_half.pt"
    st = tiny_config(data, tiny_clip_config, setting="transductive")
    st.self_train.iters = 2
    first = tmp_path / "st_first.pt"
    shutil.copy(train(st, tmp_path / "st", init=init), first)
    main.train.lr = 5e-3  # the main run retrains (another recipe) and rewrites ckpt_half.pt
    train(main, tmp_path / "main", resume=True)
    capsys.readouterr()
    final = train(st, tmp_path / "st", init=init, resume=True)
    lines = start_over_lines(capsys)
    assert len(lines) == 1 and "init" in lines[0], lines
    assert not same(final, first)
    assert same(final, train(st, tmp_path / "st_fresh", init=init))


def test_new_clip_starts_the_run_over_instead_of_failing(tmp_path, data, tiny_clip_config, capsys):
    """A rerun of the demo's CLIP pre-training: the same model, new weights in the same file."""
    from cascade_clip.config import ClipConfig
    from cascade_clip.model import load_clip

    weights = tmp_path / "clip.pt"

    def write_clip(seed: int) -> None:
        spec = ClipConfig(model="tiny", pretrained="random", model_config=tiny_clip_config, image_size=32)
        state = load_clip(spec)[0].state_dict()  # the same seeded CLIP every time: move it
        g = torch.Generator().manual_seed(seed)
        torch.save({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in state.items()}, weights)

    write_clip(0)
    cfg = tiny_config(data, tiny_clip_config, iters=2)
    cfg.clip.pretrained = str(weights)
    old = tmp_path / "old.pt"
    shutil.copy(train(cfg, tmp_path / "run"), old)
    write_clip(1)
    capsys.readouterr()
    final = train(cfg, tmp_path / "run", resume=True)  # before: "trained on another CLIP"
    lines = start_over_lines(capsys)
    assert len(lines) == 1 and "clip" in lines[0], lines
    assert not same(final, old)


def test_moved_dataset_resumes(tmp_path, data, tiny_clip_config):
    """The data copied to another folder (dataset.root edited) after a crash, with new file
    times (a plain `cp -r`; a `mv` keeps them and is not even read again): the run resumes and
    ends with the weights of an uninterrupted run."""
    cfg = tiny_config(data, tiny_clip_config)
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "run", on_step=crash_at(3))
    moved = tmp_path / "scratch" / "data"
    shutil.copytree(data, moved, copy_function=shutil.copy)
    shutil.rmtree(data)
    cfg.dataset.root = str(moved)
    final = train(cfg, tmp_path / "run", resume=True)
    assert resumed_at(tmp_path / "run") == [2]
    assert same(final, train(cfg, tmp_path / "whole"))


def test_self_train_edit_leaves_the_main_run_alone(tmp_path, data, tiny_clip_config, capsys):
    """`self_train.iters` is the self-training run's schedule: the inductive run resumes across
    its edit; the self-training run itself starts over."""
    cfg = tiny_config(data, tiny_clip_config)
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "main", on_step=crash_at(3))
    cfg.self_train.iters = 7
    train(cfg, tmp_path / "main", resume=True)
    assert resumed_at(tmp_path / "main") == [2]

    st = tiny_config(data, tiny_clip_config, setting="transductive")
    init = tmp_path / "main" / "ckpt_half.pt"
    with pytest.raises(Interrupt):
        train(st, tmp_path / "st", init=init, on_step=crash_at(3))
    st.self_train.iters = 5
    capsys.readouterr()
    train(st, tmp_path / "st", init=init, resume=True)
    lines = start_over_lines(capsys)
    assert len(lines) == 1 and "self_train.iters: 4 -> 5" in lines[0], lines


def test_rebuilt_cache_resumes_and_another_cache_starts_over(tmp_path, data, tiny_clip_config, capsys):
    """A feature cache rebuilt alike (new shard files, the same rows: what the workflow does
    after the data moved) is the same input; one with other views is not."""
    from cascade_clip.cache import join_shards, write_shard
    from cascade_clip.model import CascadeCLIP, load_clip

    def build_cache(cfg, name: str) -> Path:
        torch.manual_seed(cfg.seed)  # the random tiny CLIP that train() builds with this seed
        model = CascadeCLIP(load_clip(cfg.clip)[0], cfg.model).eval()
        shard = write_shard(cfg, "train", (0, 1), tmp_path / name / "s.h5", model=model, progress=False,
                            log=lambda m: None)
        return join_shards([shard], tmp_path / name / "train.h5")

    cfg = tiny_config(data, tiny_clip_config)
    cache = build_cache(cfg, "first")
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "run", cache=cache, on_step=crash_at(3))
    shutil.rmtree(tmp_path / "first")
    cache = build_cache(cfg, "first")
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "run", cache=cache, resume=True, on_step=crash_at(5))
    assert resumed_at(tmp_path / "run") == [2]

    cfg.cache.views_per_image = 2  # the workflow rebuilds the cache and reruns the rule
    capsys.readouterr()
    train(cfg, tmp_path / "run", cache=build_cache(cfg, "second"), resume=True)
    lines = start_over_lines(capsys)
    assert len(lines) == 1 and "cache" in lines[0], lines
