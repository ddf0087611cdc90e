"""Training and evaluation throughput: `cascade_clip.train.train` and `evaluate` end to end.

Cases (figures in ``benchmark.extra_info``):

- ``test_train[frozen-cache|vpt-torch|triton]``: a whole `train()` run; its own
  log.jsonl gives the steady-state it/s (the last logged interval, after a warm-up
  interval that includes start-up), plus the peak memory of the run: CUDA
  ``max_memory_allocated`` on a GPU, on CPU the peak resident-set growth over the run
  (sampled every 2 ms from /proc). ``kernels=triton`` forces the Triton kernels
  (``CASCADE_CLIP_KERNELS=triton``) and runs only on CUDA; ``torch`` forces the PyTorch
  references. Both run in the same session, so their figures compare.
- ``test_evaluate``: `evaluate()` over the validation images (sliding window): images/s.

Sizes: the demo ("shapes world") size by default: a random small CLIP shaped like the
pipeline's (ViT 128x128, patch 8, width 128, 6 blocks, 128-d), taps [[4, 5], [6]], the
default 3-layer decoders, 14 queries, batch 4. ``CASCADE_CLIP_BENCH_FULL=1`` switches to
the paper size: a ViT-B/16-shaped random encoder at 512x512, taps 6..12, batch 4,
156 queries (COCO-Stuff's seen classes), slow on CPU.

With ``--benchmark-disable`` (the normal test run) every case runs once with 2 steps:
a smoke test, not a measurement.

    python -m pytest benchmarks/bench_train.py --benchmark-enable -s
    CASCADE_CLIP_BENCH_FULL=1 python -m pytest benchmarks/bench_train.py --benchmark-enable
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from cascade_clip.config import config_from_dict

FULL = os.environ.get("CASCADE_CLIP_BENCH_FULL", "0") == "1"


@dataclass(frozen=True)
class Setup:
    name: str
    image_size: int
    clip: dict
    stages: list
    num_train: int
    num_val: int
    num_classes: int  # the shapes world has 18; the paper size pads with synthetic names
    batch: int
    interval: int  # steps per logged interval: one warm-up interval, one measured


_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}
DEMO = Setup(
    name="demo: ViT 128px/8, width 128, 6 blocks",
    image_size=128,
    clip={
        "embed_dim": 128,
        "vision_cfg": {"image_size": 128, "patch_size": 8, "width": 128, "layers": 6, "head_width": 32},
        "text_cfg": _TEXT,
    },
    stages=[[4, 5], [6]],
    num_train=8,
    num_val=4,
    num_classes=18,
    batch=4,
    interval=5,
)
PAPER = Setup(
    name="paper: ViT-B/16 512px",
    image_size=512,
    clip={
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12},
        "text_cfg": _TEXT,
    },
    stages=[[6, 7, 8], [9, 10, 11], [12]],
    num_train=8,
    num_val=2,
    num_classes=171,
    batch=4,
    interval=5,
)
SETUP = PAPER if FULL else DEMO


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """A generated shapes world, the config, and a feature cache of its training views."""
    from cascade_clip import cache
    from cascade_clip.data.shapes import generate_shapes
    from cascade_clip.model import CascadeCLIP, load_clip

    tmp = tmp_path_factory.mktemp("bench_train")
    root = generate_shapes(
        tmp / "shapes",
        seed=0,
        num_train=SETUP.num_train,
        num_val=SETUP.num_val,
        image_size=SETUP.image_size,
        progress=False,
    )
    meta = json.loads((root / "dataset.json").read_text())
    extra = [f"synthetic class {i}" for i in range(len(meta["classes"]), SETUP.num_classes)]
    if extra:  # paper size: as many queries as COCO-Stuff (labels use the first 18 only)
        meta["classes"] += extra
        (root / "dataset.json").write_text(json.dumps(meta))
    cfg = config_from_dict(
        {
            "experiment": "bench_train",
            "clip": {
                "model": "bench",
                "pretrained": "random",
                "model_config": SETUP.clip,
                "image_size": SETUP.image_size,
                "templates": "official-single",
            },
            "model": {"stages": SETUP.stages, "vpt_tokens": 10},
            "dataset": {"name": "shapes", "root": str(root)},
            "train": {
                "batch_size": SETUP.batch,
                "num_workers": 0,
                "warmup_iters": 2,
                "checkpoint_interval": 10_000,
                "augment": {"scale": [SETUP.image_size * 4, SETUP.image_size], "crop_size": SETUP.image_size},
            },
            "evaluate": {
                "crop_size": SETUP.image_size,
                "stride": SETUP.image_size * 5 // 6,
                "short_side": SETUP.image_size,
                "num_visualize": 0,
            },
        }
    )
    torch.manual_seed(cfg.seed)  # the random CLIP that train() builds with this seed
    model = CascadeCLIP(load_clip(cfg.clip)[0], cfg.model).eval()
    shard = cache.write_shard(cfg, "train", (0, 1), tmp / "shard.h5", model=model, progress=False, log=print)
    index = cache.join_shards([shard], tmp / "train.h5")
    return {"tmp": tmp, "cfg": cfg, "cache": index}


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or on CPU the peak growth of the
    process's resident set, sampled every 2 ms."""

    def __init__(self) -> None:
        self.peak_mb = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def measure(self, fn: Callable[[], Any]) -> Any:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            return out
        base, peak, done = self._rss(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], self._rss())
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            return fn()
        finally:
            done.set()
            thread.join()
            self.peak_mb = max(0, max(peak[0], self._rss()) - base) / 2**20


def loss_records(log: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in records if "loss" in r]


def last_interval(log: Path) -> dict[str, Any]:
    return loss_records(log)[-1]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("path", ["frozen-cache", "vpt"])
def test_train(benchmark, world, path, kernels, monkeypatch):
    if kernels == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton kernels are measured on CUDA only (the interpreter is no measurement)")
    from cascade_clip.train import train

    monkeypatch.setenv("CASCADE_CLIP_KERNELS", kernels)
    cfg = copy.deepcopy(world["cfg"])
    cfg.model.encoder_mode = "vpt" if path == "vpt" else "frozen"
    interval = 1 if benchmark.disabled else SETUP.interval
    cfg.train.iters, cfg.train.log_interval = 2 * interval, interval
    out = world["tmp"] / f"run-{path}-{kernels}"
    memory = PeakMemory()

    def run() -> Path:
        return memory.measure(
            lambda: train(cfg, out, cache=world["cache"] if path == "frozen-cache" else None)
        )

    benchmark.pedantic(run, rounds=1, iterations=1)
    rec = last_interval(out / "log.jsonl")
    benchmark.extra_info.update(
        {
            "setup": SETUP.name,
            "device": device_name(),
            "path": path,
            "kernels": kernels,
            "batch": SETUP.batch,
            "it_s": rec["it_s"],
            "images_s": rec["it_s"] * SETUP.batch,
            "peak_mb": round(memory.peak_mb, 1),
        }
    )
    print(f"\n[bench_train] {SETUP.name} {path} kernels={kernels}: {benchmark.extra_info}")
    assert rec["step"] == cfg.train.iters
    losses = [r["loss"] for r in loss_records(out / "log.jsonl")]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), losses
    assert math.isfinite(rec["it_s"]) and rec["it_s"] > 0


def test_evaluate(benchmark, world):
    from cascade_clip.evaluate import evaluate
    from cascade_clip.train import train

    cfg = copy.deepcopy(world["cfg"])
    cfg.train.iters = 1
    ckpt = train(cfg, world["tmp"] / "eval-run", cache=world["cache"])
    metrics: dict[str, Any] = {}
    memory = PeakMemory()

    def run() -> None:
        metrics.update(memory.measure(lambda: evaluate(cfg, world["tmp"] / "eval", checkpoint=ckpt)))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(
        {
            "setup": SETUP.name,
            "device": device_name(),
            "images": metrics["num_images"],
            "images_s": metrics["images_per_s"],
            "peak_mb": round(memory.peak_mb, 1),
        }
    )
    print(f"\n[bench_train] {SETUP.name} evaluate: {benchmark.extra_info}")
    assert metrics["num_images"] == SETUP.num_val
    assert math.isfinite(metrics["images_per_s"]) and metrics["images_per_s"] > 0
    # the val images hold seen classes, so the seen mIoU exists, in percent
    assert math.isfinite(metrics["miou_seen"]) and 0 <= metrics["miou_seen"] <= 100
    assert (world["tmp"] / "eval" / "metrics.json").is_file()
