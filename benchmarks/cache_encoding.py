"""The feature cache's encodings side by side (`cache.encoding`; cascade_clip/cache/encoding.py).

For real-shaped features, in one run: bytes per view as HDF5 stores them, reconstruction
error against the encoder's fp32 output, and write, read and verify throughput, for

- `fp16` and `int8` (the config's choices), and `fp8` (e4m3, each token scaled to 448 and
  renormalised on read: the same bytes as int8; measured for the record, not offered);
- two encoders: ViT-B/16 at 512 px with the rehearsal's seeded random weights
  (tests/rehearsal/mirrors.py `random_clip_weights`, open_clip ViT-B-16-quickgelu, seed 0)
  on augmented views of a generated 512-px shapes world, and the demo's pre-trained small
  CLIP on augmented views of the demo's own training images (needs a finished demo).

    python benchmarks/cache_encoding.py --demo .              # after `snakemake --cores all` here
    python benchmarks/cache_encoding.py --vit-images 4        # ViT-B/16 only

Error per token (tokens are unit vectors): the L2 distance between the decoded and the fp32
token (rms over tokens, and the largest), and 1 - cosine. Write: encode (on the CPU) +
checksum + one HDF5 row write per view into a shard-like dataset (one view per chunk), views/s;
read: one row slice per view + decode, views/s; verify: `encoding.check_rows`, views/s.
Prints a table and writes it as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from cascade_clip.cache import build_model
from cascade_clip.cache.encoding import check_rows, decode, encode, row_checksum
from cascade_clip.config import Config, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
ENCODINGS = ("fp16", "int8", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def encode_any(tokens: torch.Tensor, encoding: str) -> np.ndarray:
    """fp32 unit tokens (..., C) -> stored array (fp8 as its bytes, uint8)."""
    if encoding != "fp8":
        return encode(tokens, encoding).numpy()
    peak = tokens.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    return (tokens * (FP8_MAX / peak)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def decode_any(stored: np.ndarray, encoding: str) -> torch.Tensor:
    t = torch.from_numpy(stored)
    if encoding != "fp8":
        return decode(t)
    x = t.view(torch.float8_e4m3fn).float()
    return x / x.norm(dim=-1, keepdim=True)


def vit_b16(work: Path, images: int) -> tuple[Config, str]:
    """ViT-B/16 at 512 with the rehearsal's random weights, on a generated 512-px world."""
    sys.path.insert(0, str(ROOT / "tests"))
    from rehearsal.mirrors import random_clip_weights

    from cascade_clip.data.shapes import generate_shapes

    weights = random_clip_weights(work / "ViT-B-16-quickgelu-random.pt")
    root = generate_shapes(work / "shapes512", seed=0, num_train=images, num_val=1, image_size=512,
                           progress=False)
    cfg = config_from_dict({
        "experiment": "encoding", "clip": {"model": "ViT-B-16-quickgelu", "pretrained": str(weights),
                                           "image_size": 512},
        "model": {"stages": [[6, 7, 8], [9, 10, 11], [12]], "tap_projection": "random",
                  "cls_token": "official", "encoder_mode": "frozen"},
        "dataset": {"name": "shapes", "root": str(root), "unseen": []},
        "train": {"augment": {"scale": [2048, 512], "ratio_range": [0.5, 2.0], "crop_size": 512}},
    })
    return cfg, f"ViT-B/16 @512, rehearsal random weights, {images} views"


def demo_clip(demo: Path, images: int) -> tuple[Config, str]:
    """The finished demo's own config, CLIP and training images."""
    import os

    os.chdir(demo)  # the demo config's paths are relative to its workflow folder
    cfg = load_config(demo / "results" / "shapes" / "config.yaml", {"model.encoder_mode": "frozen"})
    return cfg, f"demo small CLIP @{cfg.clip.image_size}, {images} views"


def features(cfg: Config, images: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 taps (M, L, N, C) and global tokens (M, C) of the first `images` training views
    (view 0 of each image, as the cache writer draws it)."""
    from cascade_clip.data.dataset import SegmentationDataset
    from cascade_clip.data.transforms import train_transform

    model = build_model(cfg, "cpu")
    data = SegmentationDataset(cfg.dataset.root, cfg.dataset.train_split, mode="fully_supervised",
                               transform=train_transform(cfg.train.augment), seed=cfg.seed)
    taps, glob = [], []
    for start in range(0, images, batch):
        stack = torch.stack([data[i]["image"] for i in range(start, min(images, start + batch))])
        with torch.inference_mode():
            f = model.encode(stack)
        taps.append(f.taps.transpose(0, 1).float())
        glob.append(f.global_token.float())
    return torch.cat(taps), torch.cat(glob)


def measure(taps: torch.Tensor, glob: torch.Tensor, encoding: str, path: Path, rounds: int) -> dict:
    m = len(taps)
    write, read, verify = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        stored = encode_any(taps, encoding)
        g16 = glob.to(torch.float16).numpy()
        sums = np.array([row_checksum(t, g) for t, g in zip(stored, g16)], np.uint32)
        with h5py.File(path, "w") as f:
            d = f.create_dataset("taps", stored.shape, stored.dtype, chunks=(1, *stored.shape[1:]))
            for r in range(m):
                d[r] = stored[r]
            f.create_dataset("global_token", data=g16)
            f.create_dataset("checksum", data=sums)
        write.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with h5py.File(path) as f:
            back = torch.stack([decode_any(f["taps"][r], encoding) for r in range(m)])
        read.append(time.perf_counter() - t0)
        if encoding != "fp8":  # check_rows knows the offered encodings only
            t0 = time.perf_counter()
            with h5py.File(path) as f:
                check_rows(f, path, range(m))
            verify.append(time.perf_counter() - t0)
    with h5py.File(path) as f:
        taps_bytes = f["taps"].id.get_storage_size()
        per_view = sum(f[name].id.get_storage_size() for name in f) / m
    err = (back - taps).norm(dim=-1)
    cos = (back * taps).sum(-1) / (back.norm(dim=-1) * taps.norm(dim=-1))
    return {
        "encoding": encoding, "taps_bytes_per_view": taps_bytes / m, "bytes_per_view": per_view,
        "err_rms": float(err.pow(2).mean().sqrt()), "err_max": float(err.max()),
        "one_minus_cos_mean": float((1 - cos).mean()), "one_minus_cos_max": float((1 - cos).max()),
        "write_views_per_s": m / min(write), "read_views_per_s": m / min(read),
        "verify_views_per_s": m / min(verify) if verify else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default=None, help="a folder `snakemake --cores all` finished in")
    parser.add_argument("--vit-images", type=int, default=8, help="ViT-B/16 views (0: skip)")
    parser.add_argument("--demo-images", type=int, default=64, help="demo views")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (the best is kept)")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    setups = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.vit_images:
            setups.append((*vit_b16(work, args.vit_images), args.vit_images))
        if args.demo:
            setups.append((*demo_clip(Path(args.demo).resolve(), args.demo_images), args.demo_images))
        rows = []
        for cfg, name, images in setups:
            taps, glob = features(cfg, images)
            peak = taps.abs().amax(-1) / taps.pow(2).mean(-1).sqrt()
            print(f"\n{name}: taps {tuple(taps.shape[1:])} per view, peak/rms per token: median "
                  f"{peak.median():.2f}, max {peak.max():.2f}")
            print(f"{'encoding':9s} {'bytes/view':>12s} {'err rms':>9s} {'err max':>9s} {'1-cos max':>10s} "
                  f"{'write/s':>8s} {'read/s':>8s} {'verify/s':>8s}")
            for enc in ENCODINGS:
                r = {"setup": name, **measure(taps, glob, enc, work / f"{enc}.h5", args.rounds)}
                rows.append(r)
                verify = f"{r['verify_views_per_s']:8.1f}" if r["verify_views_per_s"] else f"{'-':>8s}"
                print(f"{enc:9s} {r['bytes_per_view']:12,.0f} {r['err_rms']:9.2e} {r['err_max']:9.2e} "
                      f"{r['one_minus_cos_max']:10.2e} {r['write_views_per_s']:8.1f} "
                      f"{r['read_views_per_s']:8.1f} {verify}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
