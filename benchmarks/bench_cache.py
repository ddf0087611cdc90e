"""Feature-cache benchmarks: storage per view, write/read throughput, cached vs online step.

Cases (each records its figures in ``benchmark.extra_info``):

- ``test_storage[none|gzip|lzf|gzip-shuffle]``: real encoder features (L2-normalised fp16 taps of
  augmented views) written to HDF5 with one view per chunk; bytes per view, write and
  read views/s.
- ``test_write_shard``: the whole ``write_shard`` pipeline (decode, augment, encode,
  write, flush): images/s.
- ``test_read_cache``: ``FeatureCacheDataset`` items (taps + label rebuilt from the view)
  through a DataLoader: items/s.
- ``test_read_rows[list-index|row-slices]``: a batch of random shard rows read with h5py's
  list indexing (``taps[[r0, r1, ...]]``) against one slice per row (what the reader does):
  batches/s; both read the same arrays.
- ``test_step[cached|online]``: one training step of the head (forward, focal+dice loss,
  backward, AdamW) on the same batch, from cached features vs with the frozen encoder
  run online on the augmented images (both with their inputs in memory); and
  ``test_load_batch[cached|online]``: producing that batch (cache rows + labels vs
  decoding + augmenting images); ``test_encoder_forward``: the encoder alone on that batch.

Sizes: by default a shapes-world-sized random CLIP (ViT, 128x128 input, patch 16, width
256, 4 blocks, 3 tapped) on a tiny generated shapes world, cheap enough for the normal
test run. ``CASCADE_CLIP_BENCH_FULL=1`` switches to a ViT-B/16-shaped random encoder at
512x512 (taps 6..12, 32x32 grid, 512-d) with 156 queries: slow on CPU.

    python -m pytest benchmarks/bench_cache.py --benchmark-enable
    CASCADE_CLIP_BENCH_FULL=1 python -m pytest benchmarks/bench_cache.py --benchmark-enable

Each case also checks what it measured: stored features read back equal, a rewritten shard
equals the first, every cached item is read, the cached and online batches carry the same
labels, a step's loss is finite and moves the head, the encoder reproduces the cached taps.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from statistics import median

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from cascade_clip import cache
from cascade_clip.cache import write as cache_write
from cascade_clip.config import Config, config_from_dict
from cascade_clip.kernels.seg_loss import sigmoid_focal_dice_loss

FULL = os.environ.get("CASCADE_CLIP_BENCH_FULL", "0") == "1"
# The encoder and the head run where training runs them: on the GPU when there is one, with
# the bf16 autocast of `train` (the cache itself is read on the host either way).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
AMP = DEVICE.type == "cuda"


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Setup:
    name: str
    image_size: int
    clip: dict
    stages: list
    decoder: dict
    num_images: int
    views: int
    batch: int
    queries: int
    rounds: int
    augment: dict = field(default_factory=dict)


SMALL = Setup(
    name="shapes-sized",
    image_size=128,
    clip={"embed_dim": 256,
          "vision_cfg": {"image_size": 128, "patch_size": 16, "width": 256, "layers": 4, "head_width": 64},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}},
    stages=[[2, 3], [4]],
    decoder={"layers": 3, "heads": 8, "ffn_dim": 1024, "dropout": 0.0},
    num_images=8,
    views=2,
    batch=4,
    queries=14,
    rounds=5,
    augment={"scale": [256, 128], "ratio_range": [0.5, 2.0], "crop_size": 128},
)
VIT_B16 = Setup(
    name="ViT-B/16@512",
    image_size=512,
    clip={"embed_dim": 512,
          "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 1}},
    stages=[[6, 7, 8], [9, 10, 11], [12]],
    decoder={"layers": 3, "heads": 8, "ffn_dim": 2048, "dropout": 0.0},
    num_images=4,
    views=1,
    batch=4,
    queries=156,
    rounds=2,
    augment={"scale": [2048, 512], "ratio_range": [0.5, 2.0], "crop_size": 512},
)
SETUP = VIT_B16 if FULL else SMALL


def setup_config(setup: Setup, root: str | os.PathLike) -> Config:
    """The config of a setup: its random CLIP, head and augmentation, every class seen."""
    return config_from_dict({
        "experiment": "bench",
        "clip": {"model": "bench", "pretrained": "random", "model_config": setup.clip,
                 "image_size": setup.image_size, "templates": "official-single"},
        "model": {"stages": setup.stages, "decoder": setup.decoder},
        "dataset": {"name": "shapes", "root": str(root), "unseen": []},
        "train": {"augment": setup.augment},
        # fp16: the codecs' figures are of fp16 features (benchmarks/cache_encoding.py compares
        # the encodings themselves)
        "cache": {"views_per_image": setup.views, "batch_size": setup.batch, "encoding": "fp16"},
    })


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A generated shapes world (every class seen), a config, the model and a written cache."""
    from cascade_clip.data.shapes import generate_shapes

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("bench_cache")
    root = generate_shapes(tmp / "shapes", seed=0, num_train=SETUP.num_images, num_val=1,
                           image_size=SETUP.image_size, progress=False)
    cfg = setup_config(SETUP, root)
    model = cache.build_model(cfg, DEVICE)
    shard = cache.write_shard(cfg, "train", (0, 1), tmp / "shard.h5", model=model, progress=False,
                              log=lambda _m: None)
    return {"tmp": tmp, "cfg": cfg, "model": model, "shard": shard}


def _record(benchmark, **info) -> None:
    benchmark.extra_info.update({"setup": SETUP.name, **info})


@pytest.fixture(scope="module")
def features(env):
    """(taps (M, L, N, C) fp16, global (M, C) fp16) of every cached view."""
    with h5py.File(env["shard"]) as f:
        return f["taps"][:], f["global_token"][:]


COMPRESSIONS = {"none": {}, "gzip": {"compression": "gzip"}, "lzf": {"compression": "lzf"},
                "gzip-shuffle": {"compression": "gzip", "shuffle": True}}


@pytest.mark.parametrize("codec", list(COMPRESSIONS))
def test_storage(benchmark, env, features, codec):
    """HDF5 storage of real-shaped features: one view per chunk, each codec (gzip-shuffle is
    for the record only: the config offers none, gzip, lzf)."""
    taps, glob = features
    path = env["tmp"] / f"storage-{codec}.h5"
    m, times = len(taps), []

    def write() -> None:
        t0 = time.perf_counter()
        with h5py.File(path, "w") as f:
            if codec == "none":
                d = cache_write._create(f, "taps", taps.shape, np.float16, (1, *taps.shape[1:]))
            else:
                d = f.create_dataset("taps", taps.shape, np.float16, chunks=(1, *taps.shape[1:]),
                                     **COMPRESSIONS[codec])
            for r in range(m):
                d[r] = taps[r]
            f.create_dataset("global_token", data=glob)
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(write, rounds=SETUP.rounds, iterations=1)
    t0 = time.perf_counter()
    with h5py.File(path) as f:
        back = [f["taps"][r] for r in range(m)]
        stored = f["taps"].id.get_storage_size() + f["global_token"].id.get_storage_size()
        glob_back = f["global_token"][:]
    read_s = time.perf_counter() - t0
    assert all(np.array_equal(b, t) for b, t in zip(back, taps)) and np.array_equal(glob_back, glob)
    raw = taps.nbytes + glob.nbytes
    assert 0 < stored <= raw if codec == "none" else 0 < stored
    _record(benchmark, codec=codec, views=m, bytes_per_view=stored / m,
            raw_bytes_per_view=taps[0].nbytes + glob[0].nbytes, write_views_per_s=m / median(times),
            read_views_per_s=m / read_s)


def test_write_shard(benchmark, env):
    cfg, model = env["cfg"], env["model"]
    out = env["tmp"] / "write.h5"

    times = []

    def write() -> None:
        t0 = time.perf_counter()
        cache.write_shard(cfg, "train", (0, 1), out, model=model, overwrite=True, progress=False,
                          log=lambda _m: None)
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(write, rounds=max(1, SETUP.rounds // 2), iterations=1)
    with h5py.File(out) as new, h5py.File(env["shard"]) as first:
        assert new["taps"].shape[0] == SETUP.num_images * SETUP.views
        # the same config, model and views: the same features, bit for bit
        assert np.array_equal(new["taps"][:], first["taps"][:])
        assert np.array_equal(new["global_token"][:], first["global_token"][:])
    seconds = median(times)
    _record(benchmark, images=SETUP.num_images, views=SETUP.num_images * SETUP.views,
            images_per_s=SETUP.num_images / seconds, views_per_s=SETUP.num_images * SETUP.views / seconds)


def test_read_cache(benchmark, env):
    ds = cache.FeatureCacheDataset(env["shard"], env["cfg"], mode="fully_supervised")

    times, counts = [], []

    def read() -> None:
        t0 = time.perf_counter()
        n = 0
        for batch in DataLoader(ds, batch_size=SETUP.batch, num_workers=0):
            n += len(batch["taps"])
            assert torch.isfinite(batch["taps"]).all()
        times.append(time.perf_counter() - t0)
        counts.append(n)

    benchmark.pedantic(read, rounds=SETUP.rounds, iterations=1)
    assert len(ds) == SETUP.num_images * SETUP.views
    assert counts and all(n == len(ds) for n in counts)
    _record(benchmark, items=len(ds), items_per_s=len(ds) / median(times))


@pytest.mark.parametrize("how", ["list-index", "row-slices"])
def test_read_rows(benchmark, env, how):
    rng = np.random.default_rng(0)
    with h5py.File(env["shard"], "r") as f:
        taps = f["taps"]
        size = min(SETUP.batch, taps.shape[0])
        batches = [sorted(rng.choice(taps.shape[0], size, replace=False).tolist()) for _ in range(20)]

        times: list[float] = []

        def read() -> list[np.ndarray]:
            t0 = time.perf_counter()
            if how == "list-index":
                out = [taps[rows] for rows in batches]
            else:
                out = [np.stack([taps[r] for r in rows]) for rows in batches]
            times.append(time.perf_counter() - t0)
            return out

        got = benchmark.pedantic(read, rounds=SETUP.rounds, iterations=1)
        for rows, arr in zip(batches, got):
            assert np.array_equal(arr, np.stack([taps[r] for r in rows]))
    _record(benchmark, batch=size, batches_per_s=len(batches) / median(times))


def _batch_sources(env):
    """The same batch two ways: cached items, and the loader's online items (same views)."""
    from cascade_clip.data.dataset import SegmentationDataset
    from cascade_clip.data.transforms import TrainTransform

    cfg = env["cfg"]
    ds = cache.FeatureCacheDataset(env["shard"], cfg, mode="fully_supervised")
    online = SegmentationDataset(cfg.dataset.root, "train", mode="fully_supervised",
                                 transform=TrainTransform(cfg.train.augment), seed=cfg.seed)
    rows = list(range(SETUP.batch))

    def load_cached() -> dict:
        return default_collate([ds[i] for i in rows])

    def load_online() -> dict:
        items = []
        for i in rows:
            online.set_epoch(int(ds.layout.view_index[i]))
            items.append(online[int(ds.layout.image_index[i])])
        return default_collate(items)

    return load_cached, load_online


@pytest.mark.parametrize("source", ["cached", "online"])
def test_load_batch(benchmark, env, source):
    load_cached, load_online = _batch_sources(env)
    fn = load_cached if source == "cached" else load_online
    batch = benchmark.pedantic(fn, rounds=SETUP.rounds, iterations=1)
    crop = env["cfg"].train.augment.crop_size
    assert batch["label"].shape == (SETUP.batch, crop, crop)
    other = load_online() if source == "cached" else load_cached()
    assert torch.equal(batch["label"], other["label"])  # the same views both ways
    if source == "cached":
        assert batch["taps"].shape[:2] == (SETUP.batch, len(env["model"].tapped_blocks(env["cfg"].model)))
    else:
        assert batch["image"].shape == (SETUP.batch, 3, crop, crop)
    _record(benchmark, source=source, batch=SETUP.batch)


@pytest.mark.parametrize("source", ["cached", "online"])
def test_step(benchmark, env, source):
    load_cached, load_online = _batch_sources(env)
    model = env["model"]
    model.train()
    cached = load_cached()
    online = load_online()
    assert torch.equal(cached["label"], online["label"])
    target = cached["label"] % SETUP.queries
    target[cached["label"] == 255] = 255
    text = torch.nn.functional.normalize(torch.randn(SETUP.queries, model.encoder.embed_dim), dim=-1)
    opt = torch.optim.AdamW([p for p in model.head.parameters() if p.requires_grad], lr=1e-6, fused=True)
    feats = cache.to_tap_features(cached)
    feats = type(feats)(feats.taps.to(DEVICE), feats.global_token.to(DEVICE), feats.grid)
    images, target, text = online["image"].to(DEVICE), target.to(DEVICE), text.to(DEVICE)

    times, losses = [], []
    params = [p for p in model.head.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]

    def step() -> None:
        t0 = time.perf_counter()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=AMP):
            if source == "online":
                with torch.no_grad():
                    f = model.encode(images)
            else:
                f = feats
            logits = model.forward_features(f, text)
        loss = sigmoid_focal_dice_loss(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())

    benchmark.pedantic(step, rounds=SETUP.rounds, iterations=1, warmup_rounds=1)
    model.eval()
    assert losses and all(math.isfinite(v) and v > 0 for v in losses), losses
    moved = any(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert moved, "the step left the head as it was"
    _record(benchmark, source=source, batch=SETUP.batch, queries=SETUP.queries, step_s=median(times),
            device=str(DEVICE))


def test_encoder_forward(benchmark, env):
    """What the cache removes from every step: the frozen encoder on one batch of views."""
    load_cached, load_online = _batch_sources(env)
    images = load_online()["image"].to(DEVICE)
    model, times, out = env["model"], [], []

    def encode() -> None:
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=AMP):
            out[:] = [model.encode(images)]
        _sync()
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(encode, rounds=SETUP.rounds, iterations=1)
    # what the cache holds for these views: the encoder's taps, up to fp16 storage (and bf16
    # autocast on a GPU); every token's direction agrees
    cached = cache.to_tap_features(load_cached())
    cos = torch.nn.functional.cosine_similarity(out[0].taps.float().cpu(), cached.taps, dim=-1)
    assert out[0].taps.shape == cached.taps.shape and cos.min() > 0.99, cos.min().item()
    _record(benchmark, batch=SETUP.batch, forward_s=median(times))
