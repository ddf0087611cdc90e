"""`cascade-clip plan` and the cache writer's free-space check (cascade_clip.plan).

The byte figures are checked against what the code really writes: a feature shard written by
`write_shard` on a tiny CLIP and a tiny dataset, and the state dict and AdamW state of the
real model classes.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections import namedtuple
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cascade_clip import cache, plan
from cascade_clip.cli import main as cli_main
from cascade_clip.config import load_config, set_dotted
from cascade_clip.testing import tiny_clip_config

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["sky", "grass", "cat", "dog", "tree"]
NUM_IMAGES = 7


def _write_dataset(root: Path) -> None:
    rng = np.random.default_rng(1)
    for sub in ("images/train", "labels/train", "splits"):
        (root / sub).mkdir(parents=True)
    ids = [f"pic_{i}" for i in range(NUM_IMAGES)]
    ids[3] = "a_longer_id_3"  # the id column is as wide as the longest id
    for i, image_id in enumerate(ids):
        h, w = 34 + 3 * i, 40
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "images/train" / f"{image_id}.png")
        label = np.zeros((h, w), np.uint8)
        label[h // 2:] = 1
        label[:8, :10] = 2 + i % 3
        Image.fromarray(label, mode="L").save(root / "labels/train" / f"{image_id}.png")
    (root / "splits/train.txt").write_text("\n".join(ids) + "\n")
    (root / "dataset.json").write_text(json.dumps(
        {"name": "tiny", "classes": CLASSES, "image_suffix": ".png", "label_suffix": ".png"}))


def _config(root: Path, results: Path, **over) -> dict:
    d = {
        "experiment": "tiny",
        "seed": 5,
        "results_dir": str(results),
        "clip": {"model": "tiny", "pretrained": "random", "model_config": tiny_clip_config(),
                 "image_size": 32, "templates": "official-single"},
        "model": {"stages": [[2, 3], [4]], "encoder_mode": "frozen", "vpt_tokens": 3,
                  "decoder": {"layers": 2, "heads": 2, "ffn_dim": 64, "dropout": 0.0}},
        "dataset": {"name": "tiny", "root": str(root), "unseen": ["dog", "tree"]},
        "train": {"augment": {"scale": [64, 32], "ratio_range": [0.5, 2.0], "crop_size": 32,
                              "cat_max_ratio": 0.75}},
        "cache": {"views_per_image": 2, "batch_size": 4},
        "ablations": {"cascade": {}, "last_block": {"model.stages": [[4]]}},
        "workflow": {"cache_shards": 2},
    }
    for dotted, value in over.items():
        set_dotted(d, dotted, value)
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan_world")
    _write_dataset(tmp / "data")
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp / "data", tmp / "results")))
    return {"tmp": tmp, "cfg_path": cfg_path, "cfg": load_config(cfg_path)}


@pytest.fixture(scope="module")
def shards(world):
    """The two shards of the tiny config, written by the cache writer."""
    cfg = world["cfg"]
    model = cache.build_model(cfg)
    out = world["tmp"] / "cache"
    return [cache.write_shard(cfg, "train", (i, 2), out / f"shard-{i}-of-2.h5", model=model,
                              progress=False, log=lambda _m: None) for i in range(2)]


def _storage_bytes(path: Path) -> int:
    with h5py.File(path) as f:
        return sum(f[name].id.get_storage_size() for name in f)


def _plan_text(capsys, *argv: str) -> str:
    assert cli_main(["plan", *argv]) == 0
    return capsys.readouterr().out


# --- the cache figure against a written cache ----------------------------------------------------


def test_shard_bytes_equal_a_written_shard(world, shards):
    cfg = world["cfg"]
    for i, path in enumerate(shards):
        data, rows = plan.shard_data_bytes(cfg, "train", (i, 2))
        assert data == _storage_bytes(path)  # every dataset of the layout, byte for byte
        assert rows == (NUM_IMAGES * (i + 1) // 2 - NUM_IMAGES * i // 2) * 2
        # the file adds HDF5 bookkeeping; the space check's allowance covers it
        assert data < path.stat().st_size <= data + plan.shard_allowance(rows)


def test_plan_cache_figure_is_the_written_cache(world, shards, capsys):
    p = plan.make_plan(world["cfg_path"])
    assert p.cache is not None and p.cache.images == NUM_IMAGES and p.cache.views == 2
    written = sum(_storage_bytes(s) for s in shards)
    assert p.cache.data_bytes == written
    row = p.cache.row  # 3 taps x 4x4 tokens x 32 channels (1 or 2 bytes), global token fp16, metadata
    value_bytes = {"fp16": 2, "int8": 1}[world["cfg"].cache.encoding]
    assert (row.taps, row.global_token) == (3 * 16 * 32 * value_bytes, 32 * 2)
    assert row.metadata == 8 + 2 + len("a_longer_id_3") + 512 + len(CLASSES) + 1 + 4
    out = _plan_text(capsys, "--config", str(world["cfg_path"]))
    assert f"per image-view: {row.total:,} bytes" in out
    assert f"{NUM_IMAGES} training images" in out and f"{written:,} bytes" in out
    assert "in 2 shard(s)" in out


# --- checkpoints against the real model ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["frozen", "vpt"])
def test_checkpoint_sizes_match_the_real_model(world, mode):
    from cascade_clip.model import CascadeCLIP, load_clip

    cfg = load_config(world["cfg_path"], {"model.encoder_mode": mode})
    sizes, shape = plan.checkpoint_sizes(cfg)  # vision tower on the meta device
    clip, _ = load_clip(cfg.clip)
    model = CascadeCLIP(clip, cfg.model)
    assert (shape.layers, shape.width, shape.patch_size, shape.embed_dim) == (4, 48, 8, 32)
    state = model.trainable_state_dict()
    assert sizes.model_bytes == sum(t.numel() * t.element_size() for t in state.values())
    params = [p for p in model.parameters() if p.requires_grad]
    assert sizes.trainable_params == sum(p.numel() for p in params)
    if mode == "vpt":
        assert any(k.startswith("encoder.prompts.") for k in state)
    # ckpt_last holds the optimiser state: AdamW's as `train` builds it, after a step
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    sum(p.sum() for p in params).backward()
    opt.step()
    opt_bytes = sum(v.numel() * v.element_size() for s in opt.state_dict()["state"].values()
                    for v in s.values() if torch.is_tensor(v))
    assert sizes.optimizer_bytes == opt_bytes
    assert sizes.last_bytes == sizes.model_bytes + opt_bytes


# --- the real configs ------------------------------------------------------------------------------


def _vit_b16_row(classes: int, id_bytes: int, value_bytes: int) -> int:
    """One ViT-B/16@512 cache row by hand: 7 taps x 1024 tokens x 512 channels (fp16: 2 bytes,
    int8: 1), global token fp16, image/view index, id, view JSON, class presence, done flag,
    checksum."""
    return 7 * 1024 * 512 * value_bytes + 512 * 2 + 8 + 2 + id_bytes + 512 + classes + 1 + 4


@pytest.mark.parametrize("encoding, per_view, total", [("fp16", 7_341_766, "868 GB"),
                                                       ("int8", 3_671_750, "434 GB")])
def test_plan_coco_stuff_prints_the_sizes(tmp_path, capsys, encoding, per_view, total):
    out = _plan_text(capsys, "--config", str(ROOT / "config/coco_stuff.yaml"),
                     "--set", f"dataset.root={tmp_path / 'coco'}", "--set", "model.encoder_mode=frozen",
                     "--set", f"cache.encoding={encoding}")
    for line in ("train2017.zip                      19.3 GB", "val2017.zip                        816 MB",
                 "stuffthingmaps_trainval2017.zip    ~659 MB", "benchmark.tgz                      1.42 GB",
                 "trainval_merged.json               ?"):
        assert line in out  # the dataset's archives and its cross_eval targets'
    row = _vit_b16_row(171, 12, {"fp16": 2, "int8": 1}[encoding])
    assert row == per_view  # ~7.3 MB per image-view in fp16, half in int8
    assert f"per image-view: {row:,} bytes" in out and f"512 channels {encoding} " in out
    # 118,287 images in 4 shards; /global_token is allocated in chunks of 256 rows
    counts = [(i + 1) * 118_287 // 4 - i * 118_287 // 4 for i in range(4)]
    expect = sum(n * (row - 1024) + -(-n // 256) * 256 * 1024 for n in counts)
    assert "118,287 training images" in out and f"{expect:,} bytes ({total})" in out
    other = {"fp16": "int8", "int8": "fp16"}[encoding]
    assert f"as {other} (cache.encoding: {other}): " + {"fp16": "434 GB", "int8": "869 GB"}[encoding] in out
    assert "cascade " in out and "cascade_st" in out and "ckpt_last" in out
    assert "train cascade (80,000 it): not measured" in out  # fp32 (amp false): no measurement
    assert "Disk in all: ~" in out


def test_plan_says_which_frozen_rows_read_the_cache_and_what_each_way_costs(tmp_path, capsys):
    """`cache.enabled: false` (config-wide or one row's): the row trains online, the plan puts
    no cache on the disk and still says what the cache would take; either way each frozen
    run's time is given both ways (measured, or why not)."""
    argv = ["--config", str(ROOT / "config/coco_stuff.yaml"), "--set", f"dataset.root={tmp_path / 'coco'}",
            "--set", "train.amp=true", "--set", "cache.encoding=int8"]
    out = _plan_text(capsys, *argv)
    assert "Feature cache (read by run(s) frozen;" in out
    assert "without it (cache.enabled: false): no cache on disk" in out
    assert "feature cache 434 GB" in out  # in the disk total
    assert "train frozen (80,000 it): ~3.8 h at 5.82 it/s" in out
    assert "    online (cache.enabled: false): not measured: " in out
    rows = "{cascade: {}, frozen: {model.encoder_mode: frozen, cache.enabled: false}}"
    out = _plan_text(capsys, *argv, "--set", f"ablations={rows}")
    assert "Feature cache: none written: run(s) frozen train online from the images" in out
    assert "118,287 rows: " in out and "(434 GB)" in out  # what it would take
    assert "feature cache" not in out.split("Disk in all:")[1].split("\n")[1]
    assert "train frozen (80,000 it): not measured: " in out
    assert "    from the cache (cache.enabled: true): ~3.8 h at 5.82 it/s" in out
    assert "  cache: " not in out  # no cache job to time


def test_cache_job_time_limits_follow_the_rows(tmp_path):
    """SLURM runtimes of the cache jobs: a fixed start plus the rows a job handles."""
    coco = load_config(ROOT / "config/coco_stuff.yaml", {"dataset.root": str(tmp_path / "coco")})
    shard, join = plan.cache_job_minutes(coco, 4, gpus=1)  # 29,572 rows a shard at 0.25 s
    assert (shard, join) == (15 + 124, 15 + 12)
    assert plan.cache_job_minutes(coco, 8, gpus=1)[0] == 15 + 62
    voc = load_config(ROOT / "config/voc.yaml", {"dataset.root": str(tmp_path / "voc")})
    assert plan.cache_job_minutes(voc, 4, gpus=1) == (15 + 12, 15 + 2)
    assert plan.cache_job_minutes(voc, 4, gpus=0)[0] == 15 + 441  # 10 s a row on CPU
    other = load_config(ROOT / "config/voc.yaml", {"dataset.root": str(tmp_path / "voc"),
                                                  "dataset.train_split": "mine"})
    assert plan.cache_job_minutes(other, 4, gpus=1)[0] == 12 * 60  # not known before prepare


def test_plan_of_the_coco_grid(tmp_path, capsys):
    """The ablation grid: parameters ours and as the paper counts them (Table 7: 40.5 M for all
    three), the one cache and who reads which blocks, and the projected GPU hours."""
    out = _plan_text(capsys, "--config", str(ROOT / "config/coco_stuff_ablations.yaml"),
                     "--set", f"dataset.root={tmp_path / 'coco'}")
    lines = {line.split()[0]: line for line in out.splitlines() if " as the paper counts " in line}
    cascade = "23,117,574 ours,   40,463,622 as the paper counts (40.5 M); paper t7.cascade: 40.5 M"
    assert cascade in lines["cascade"]
    assert "(40.5 M); paper t7.last_layer: 40.5 M" in lines["t7_last_layer"]
    assert "(40.5 M); paper t7.multi_layer_fusion: 40.5 M" in lines["t7_multi_layer_fusion"]
    assert "8,407,808 ours" in lines["t4_no_cascade"] and "paper t" not in lines["t4_no_cascade"]
    shared = ("one cache of blocks [6, 7, 8, 9, 10, 11, 12] shared by frozen [6,7,8,9,10,11,12]; "
              "t10_frozen_clip [12]")
    assert shared in out
    # 20 rows of 80,000 and self-training's 40,000 iterations, each at the nearest measured rate
    assert ("cascade                 80,000 it at 2.59 it/s: 8.6 h on 4 GPUs = 34.3 GPU h; "
            "differs: train.amp false (measured true)") in out
    assert "frozen                  80,000 it at 5.82 it/s: 3.8 h on 4 GPUs = 15.3 GPU h" in out
    hours = 18 * 80_000 / 2.59 + 2 * 80_000 / 5.82 + 40_000 / 2.59  # 18 vpt rows, 2 frozen, self-training
    evals = 24 * 5000 / 2.3  # 21 runs, 2 cross-dataset targets, frozen CLIP
    assert f"total: {(4 * hours + evals) / 3600:.0f} GPU h (training {4 * hours / 3600:.0f}, " in out


def test_plan_voc_without_a_cache(capsys):
    out = _plan_text(capsys, "--config", str(ROOT / "config/voc.yaml"), "--set", "ablations={cascade: {}}")
    assert "Feature cache: none" in out and "VOCtrainval_11-May-2012.tar        2.00 GB" in out


def _demo_argv(tmp_path: Path, **over) -> list[str]:
    clip_dir = tmp_path / "clip"  # not pre-trained yet: its model config comes from `pretrain`
    sets = {"dataset.root": str(tmp_path / "shapes"), "clip.pretrained": str(clip_dir / "checkpoint.pt"),
            "clip.model_config": str(clip_dir / "model_config.json"), **over}
    argv = ["--config", str(ROOT / "config/config.yaml")]
    for key, value in sets.items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
        argv += ["--set", f"{key}={text.removesuffix(chr(10) + '...')}"]
    return argv


def test_plan_shapes_demo(tmp_path, capsys):
    out = _plan_text(capsys, *_demo_argv(tmp_path))
    assert "none: shapes is generated locally" in out
    cfg = load_config(ROOT / "config/config.yaml")
    n_train = cfg.extra["shapes"]["num_train"]
    value_bytes = {"fp16": 2, "int8": 1}[cfg.cache.encoding]
    row = 4 * 16 * 16 * 128 * value_bytes + 128 * 2 + 8 + 2 + len("train_000000") + 512 + 18 + 1 + 4
    assert f"per image-view: {row:,} bytes" in out
    assert f"{n_train:,} training images (shapes.num_train) x 1 view(s) = {n_train:,} rows" in out
    for run in ("cascade", "single_decoder", "cascade_st"):
        assert f"\n  {run} " in out  # its checkpoints
    assert "95.6 MB (measured, pretrain-clip)" in out  # the small CLIP's architecture is the measured one
    # measured wall times, or per stage "not measured" with the first setting that differs
    assert "whole workflow: 418-480 s" in out or "whole workflow: not measured (" in out


def test_plan_shapes_times_only_for_the_measured_setup(tmp_path, capsys):
    """The demo's measured wall times print for the setup NOTES.md measured, and only for it."""
    measured = {k: v for k, v in plan.DEMO_MEASURED_KEYS.items() if k not in ("dataset.name", "pretrain")}
    measured.update({f"pretrain.{k}": v for k, v in plan.DEMO_MEASURED_KEYS["pretrain"].items()})
    out = _plan_text(capsys, *_demo_argv(tmp_path, **measured))
    assert "whole workflow: 418-480 s" in out and "pretrain-clip 188-201 s" in out
    assert "177 MB (measured, make-shapes" in out
    changed = _plan_text(capsys, *_demo_argv(tmp_path, **{**measured, "train.iters": 2000}))
    assert "whole workflow: not measured (train.iters is 2000, measured with 1000)" in changed
    assert "177 MB (measured" in changed  # the world is the same
    bigger = {**measured, "shapes": {**plan.SHAPES_MEASURED, "num_train": 500}}
    changed = _plan_text(capsys, *_demo_argv(tmp_path, **bigger))
    assert "whole workflow: not measured (shapes.num_train is 500, measured with 2000)" in changed
    assert "not measured (shapes.num_train is 500" in changed and "500 training images" in changed


def test_plan_reads_no_weights_and_no_network(monkeypatch):
    import open_clip

    def refuse(*_a, **_k):
        raise AssertionError("plan must not load weights or use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for name in ("create_model", "create_model_and_transforms", "load_checkpoint"):
        monkeypatch.setattr(open_clip, name, refuse, raising=False)
    p = plan.make_plan(ROOT / "config/coco_stuff.yaml")
    assert p.shape.describe() == plan.VIT_B16
    assert plan.format_plan(p)


# --- the space check --------------------------------------------------------------------------------

Usage = namedtuple("Usage", "total used free")


def test_cache_writer_refuses_without_space_and_writes_nothing(world, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(10**9, 10**9 - 5000, 5000))
    out = world["tmp"] / "nospace" / "deeper" / "shard-0-of-1.h5"
    rc = cli_main(["cache-features", "--config", str(world["cfg_path"]), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    data, rows = plan.shard_data_bytes(world["cfg"], "train", (0, 1))
    needed = data + plan.shard_allowance(rows)
    assert str(world["tmp"]) in err and f"{needed:,} bytes" in err and "5.00 kB free" in err
    assert "cache.views_per_image (now 2)" in err and "set cache.enabled: false to train" in err
    assert "--no-space-check" in err
    assert not (world["tmp"] / "nospace").exists()  # nothing written, not even the folder


def test_no_space_check_flag_skips_the_check(world, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(10**9, 10**9, 0))
    out = world["tmp"] / "forced" / "shard-1-of-3.h5"
    argv = ["cache-features", "--config", str(world["cfg_path"]), "--shard", "1/3", "--out", str(out),
            "--device", "cpu", "--workers", "0"]
    assert cli_main(argv) == 2 and not out.exists()
    capsys.readouterr()
    assert cli_main([*argv, "--no-space-check"]) == 0
    assert out.is_file() and cache.open_layout(out).num_rows == 2 * 2


def test_space_check_counts_a_partial_file_and_skips_what_it_should(world, monkeypatch):
    cfg = world["cfg"]
    out = world["tmp"] / "resume" / "shard-0-of-1.h5"
    out.parent.mkdir()
    data, rows = plan.shard_data_bytes(cfg, "train", (0, 1))
    needed = data + plan.shard_allowance(rows)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(10**9, 10**9, 100))
    with pytest.raises(plan.NotEnoughSpaceError):
        plan.check_cache_space(cfg, "train", (0, 1), out)
    with open(cache.partial_path(out), "wb") as f:  # an earlier attempt's file: allocated in full
        f.truncate(needed - 50)
    assert plan.check_cache_space(cfg, "train", (0, 1), out) == needed
    # the writer refuses these itself (vpt, the val split), or has nothing to write
    vpt = load_config(world["cfg_path"], {"model.encoder_mode": "vpt"})
    assert plan.check_cache_space(vpt, "train", (0, 1), out) is None
    assert plan.check_cache_space(cfg, "val", (0, 1), out) is None
    out.write_bytes(b"")
    assert plan.check_cache_space(cfg, "train", (0, 1), out) is None
    cache.partial_path(out).unlink()
    with pytest.raises(plan.NotEnoughSpaceError):
        plan.check_cache_space(cfg, "train", (0, 1), out, overwrite=True)


# --- help ---------------------------------------------------------------------------------------------


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["plan", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: cascade-clip plan" in text and "--config" in text and "--set" in text
    with pytest.raises(SystemExit):
        cli_main(["cache-features", "--help"])
    assert "--no-space-check" in capsys.readouterr().out


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (7_341_762, "7.34 MB"),
                                     (868_435_510_622, "868 GB"), (19_336_861_798, "19.3 GB"),
                                     (None, "?")])
def test_fmt_bytes(n, text):
    assert plan.fmt_bytes(n) == text


def test_plan_prints_the_accumulation_and_one_gpus_memory(tmp_path, capsys):
    """The release's global batch on the GPUs the config gives: 4 x 4 x 1 as released, 1 x 4 x 4
    on one GPU (and four passes a step in the time), with the measured peak memory of a pass
    where NOTES.md has one (bf16) and the nearest measurement otherwise."""
    argv = ["--config", str(ROOT / "config/voc.yaml"), "--set", f"dataset.root={tmp_path / 'voc'}"]
    out = _plan_text(capsys, *argv)
    assert "cascade            global batch 16 = 4 process(es) x 4 image(s) x 1 accumulation step(s)" in out
    assert "cascade_st         global batch 32 = 4 process(es) x 8 image(s) x 1 accumulation step(s)" in out
    assert ("per GPU: not measured (the nearest, NOTES.md Training, H100: 2,332 MiB; this run differs: "
            "train.amp false (measured true))") in out
    out = _plan_text(capsys, *argv, "--set", "workflow.train_gpus=1", "--set", "train.amp=true")
    assert ("cascade            global batch 16 = 1 process(es) x 4 image(s) x 4 accumulation step(s); "
            "per GPU: 2,332 MiB (NOTES.md Training, H100)") in out
    assert "frozen             global batch 16 = 1 process(es) x 4 image(s) x 4 accumulation step(s)" in out
    assert "train cascade (20,000 it): ~8.6 h at 2.59 it/s (4 passes a step" in out  # 4 x the 4-GPU time
    assert "cascade                 20,000 it at 2.59 it/s: 8.6 h on 1 GPUs = 8.6 GPU h" in out
