"""Whole-training throughput at paper scale, and the wall time it projects for the paper's runs.

For each encoder mode (`vpt`: the encoder runs online with prompts; `frozen`: the head
trains from the HDF5 feature cache) it times, in one process on one device:

- real:      the project's step (bf16 autocast on a GPU, Triton kernels, the configured
             `train.compile`) fed by the real input pipeline (DataLoader, workers from
             `train.num_workers: auto`, pinned memory, prefetch);
- synthetic: the same step on one batch already on the device: the ceiling the input
             pipeline is measured against;
- authors:   the authors'-style recipe on the same loader: fp32, eager, the PyTorch
             references (CASCADE_CLIP_KERNELS=torch), plain AdamW, no graphs.

Each figure is steps/s over `--steps` steps after `--warmup`; on a GPU also the fraction
of wall time the GPU is busy (kernel time from torch.profiler over a few steps). From the
real figures it projects each paper run's wall time on 4 GPUs in DDP (each GPU steps its own
batch of 4, so a step takes about one GPU's step plus the gradient all-reduce, not counted).
`--loader` also measures the input pipeline alone: images/s for 0, 1, 2 workers, online
(decode + augmentation) and cached (HDF5 rows).

    python benchmarks/train_throughput.py --out results/throughput      # on a GPU, paper size
    python benchmarks/train_throughput.py --cpu-smoke --out /tmp/t      # any machine, tiny

Writes OUT/throughput.json and prints a table. Card, driver, torch and Triton versions are
recorded with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import DEMO, PAPER, Setup  # noqa: E402

from cascade_clip.config import config_from_dict  # noqa: E402

# The paper's runs (iterations) that the projection covers: inductive, then self-training.
PAPER_RUNS = {
    "COCO-Stuff": (80_000, 40_000),
    "VOC 2012": (20_000, 10_000),
    "PASCAL Context": (40_000, 20_000),
}


def environment() -> dict[str, str]:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["driver"] = torch.version.cuda or ""
        with contextlib.suppress(Exception):
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return info


def make_world(setup: Setup, tmp: Path, num_train: int, image_size: int | None = None) -> dict[str, Any]:
    """A generated world and the config of the setup (its images at `image_size`)."""
    from cascade_clip.data.shapes import generate_shapes

    size = image_size or setup.image_size
    root = generate_shapes(tmp / "world", seed=0, num_train=num_train, num_val=1, image_size=size,
                           progress=False)
    meta = json.loads((root / "dataset.json").read_text())
    meta["classes"] += [f"synthetic class {i}" for i in range(len(meta["classes"]), setup.num_classes)]
    # JPEG, as COCO's images: decoding is part of what the online pipeline costs
    from PIL import Image

    for png in (root / "images").rglob("*.png"):
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    meta["image_suffix"] = ".jpg"
    (root / "dataset.json").write_text(json.dumps(meta))
    cfg = config_from_dict({
        "experiment": "throughput",
        "clip": {"model": "bench", "pretrained": "random", "model_config": setup.clip,
                 "image_size": setup.image_size, "templates": "official-single"},
        "model": {"stages": setup.stages, "vpt_tokens": 10},
        "dataset": {"name": "shapes", "root": str(root), "unseen": []},
        "train": {"batch_size": setup.batch, "num_workers": "auto", "warmup_iters": 1,
                  "augment": {"scale": [setup.image_size * 4, setup.image_size],
                              "crop_size": setup.image_size}},
    })
    return {"root": root, "cfg": cfg}


def write_cache(cfg, tmp: Path) -> Path:
    from cascade_clip import cache

    shard = cache.write_shard(cfg, "train", (0, 1), tmp / "shard.h5", progress=False, log=lambda m: None)
    return cache.join_shards([shard], tmp / "train.h5")


@contextlib.contextmanager
def kernels(backend: str):
    old = os.environ.get("CASCADE_CLIP_KERNELS")
    os.environ["CASCADE_CLIP_KERNELS"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CASCADE_CLIP_KERNELS")
        else:
            os.environ["CASCADE_CLIP_KERNELS"] = old


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(cfg, mode: str, variant: str, cache: Path | None, steps: int, warmup: int,
               device: torch.device) -> dict[str, float]:
    """steps/s (and GPU-busy fraction on a GPU) of one (mode, variant)."""
    import dataclasses

    from cascade_clip.distributed import DistEnv
    from cascade_clip.kernels.seg_loss import sigmoid_focal_dice_loss
    from cascade_clip.model import CascadeCLIP, load_clip
    from cascade_clip.train.inputs import build_train_dataset, make_loader
    from cascade_clip.train.step import CompiledStep, TrainStep, model_inputs

    model_cfg = dataclasses.replace(cfg.model, encoder_mode=mode)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    authors = variant == "authors"
    torch.manual_seed(0)
    clip, _ = load_clip(cfg.clip)
    model = CascadeCLIP(clip, cfg.model).to(device).train()
    # every class queried (the paper size has COCO-Stuff's 171): random unit text embeddings
    queries = torch.nn.functional.normalize(torch.randn(num_classes(cfg), clip.visual.proj.shape[1]), dim=-1)
    queries = queries.to(device)
    step_fn = CompiledStep(TrainStep(model), "none" if authors else cfg.train.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type in ("cpu", "cuda") and not authors
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    dataset = build_train_dataset(cfg, "inductive", cache if mode == "frozen" else None)
    tap_rows = None
    batches = iter(make_loader(dataset, cfg, env, consumed=0, batch_size=cfg.train.batch_size))
    fixed = next(batches) if variant == "synthetic" else None
    fixed_inputs = model_inputs(fixed, device, tap_rows) if fixed is not None else None
    amp = device.type == "cuda" and not authors

    def one_step() -> None:
        batch = fixed if fixed is not None else next(batches)
        inputs = fixed_inputs if fixed_inputs is not None else model_inputs(batch, device, tap_rows)
        target = batch["label"].to(device, non_blocking=True).long()  # class ids = query ids, 255 ignored
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = step_fn(queries, **inputs)
        loss = sigmoid_focal_dice_loss(logits.float(), target, ignore_index=255, num_masks=None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with kernels("torch" if authors else "auto"):
        for _ in range(warmup):
            one_step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step()
        sync(device)
        result = {"it_s": steps / (time.perf_counter() - t0)}
        if device.type == "cuda":
            result["gpu_busy"] = gpu_busy_fraction(one_step, min(steps, 5))
    return result


def num_classes(cfg) -> int:
    from cascade_clip.data import load_classes

    return len(load_classes(cfg.dataset.root))


def gpu_busy_fraction(one_step, steps: int) -> float:
    """Kernel time / wall time over `steps` steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            one_step()
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) * 1e6
    busy_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return min(1.0, busy_us / wall_us)


def loader_throughput(cfg, cache: Path | None, workers: int, batches: int) -> float:
    """Images/s of the input pipeline alone (online: decode + augment; cached: rows)."""
    import dataclasses

    from cascade_clip.distributed import DistEnv
    from cascade_clip.train.inputs import build_train_dataset, make_loader

    mode = "frozen" if cache is not None else "vpt"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, encoder_mode=mode),
                              train=dataclasses.replace(cfg.train, num_workers=workers))
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    dataset = build_train_dataset(cfg, "inductive", cache)
    loader = iter(make_loader(dataset, cfg, env, 0, cfg.train.batch_size))
    next(loader)  # workers started
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * cfg.train.batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for throughput.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: the script runs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--loader", action="store_true", help="also time the input pipeline alone")
    parser.add_argument("--modes", default="frozen,vpt", help="comma-separated; empty: the loader alone")
    args = parser.parse_args(argv)

    smoke = args.cpu_smoke
    setup = DEMO if smoke else PAPER
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    steps, warmup = (2, 1) if smoke else (args.steps, args.warmup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": environment(), "setup": setup.name, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # Online images larger than the crop, as COCO's (640x480 -> resized, cropped to 512).
        size = setup.image_size * 5 // 4
        world = make_world(setup, tmp, num_train=max(2 * setup.batch, 8), image_size=size)
        cfg = world["cfg"]
        modes = [m for m in args.modes.split(",") if m]
        cache = write_cache(cfg, tmp) if "frozen" in modes or args.loader else None
        for mode in modes:
            for variant in ("real", "synthetic", "authors"):
                fig = time_steps(cfg, mode, variant, cache, steps, warmup, device)
                results[f"{mode}/{variant}"] = fig
                print(f"{mode:7s} {variant:9s} {fig['it_s']:8.2f} it/s"
                      + (f"  GPU busy {fig['gpu_busy']:.0%}" if "gpu_busy" in fig else ""), flush=True)
            real, ceiling, ref = (results[f"{mode}/{v}"]["it_s"] for v in ("real", "synthetic", "authors"))
            results[f"{mode}/summary"] = {
                "real_over_synthetic": real / ceiling,
                "speedup_over_authors": real / ref,
            }
            print(f"{mode:7s} real/synthetic {real / ceiling:.2f}, real/authors {real / ref:.2f}x")
        if args.loader:
            for workers in (0, 1, 2):
                online = loader_throughput(cfg, None, workers, 3 if smoke else 20)
                cached = loader_throughput(cfg, cache, workers, 3 if smoke else 50)
                results[f"loader/workers{workers}"] = {"online_img_s": online, "cached_img_s": cached}
                print(f"loader  {workers} workers: online {online:.1f} img/s, cached {cached:.1f} img/s")
    projection = {}
    for mode in modes:
        it_s = results[f"{mode}/real"]["it_s"]
        projection[mode] = {name: {"inductive_h": ind / it_s / 3600, "self_training_h": st / it_s / 3600}
                            for name, (ind, st) in PAPER_RUNS.items()}
    results["projection_4gpu_hours"] = projection
    for mode, runs in projection.items():
        for name, h in runs.items():
            print(f"projected {mode:6s} {name:15s} {h['inductive_h']:6.1f} h"
                  f" + self-training {h['self_training_h']:5.1f} h")
    (out / "throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{out / 'throughput.json'}: {results['environment']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
