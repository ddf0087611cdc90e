"""Two gloo processes with batch b each train exactly like one process with batch 2b, and
evaluate to the same confusion matrix as one process. On a GPU machine, the CLI under
torchrun trains and evaluates through NCCL, bf16 autocast and the Triton kernels."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train import (
    make_tiny_dataset,
    one_thread,  # noqa: F401  (autouse: one intra-op thread)
    tiny_config,
    trainable,
    write_config,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg, run_dir: Path, eval_ckpt: Path, eval_dir: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    from cascade_clip.distributed import cleanup
    from cascade_clip.evaluate import evaluate
    from cascade_clip.train import train

    torch.set_num_threads(1)  # two processes on a small shared machine: no oversubscription
    try:
        train(cfg, run_dir, device="cpu")
        evaluate(cfg, eval_dir, checkpoint=eval_ckpt, device="cpu")
    finally:
        cleanup()


def test_two_processes_match_one_with_double_batch(tmp_path, tiny_clip_config):
    from cascade_clip.evaluate import evaluate
    from cascade_clip.train import train

    root = make_tiny_dataset(tmp_path / "data", n_train=7)
    b, iters = 2, 3
    single = tiny_config(root, tiny_clip_config, batch_size=2 * b, iters=iters, checkpoint_interval=2)
    single_ckpt = train(single, tmp_path / "single", device="cpu")
    evaluate(single, tmp_path / "eval1", checkpoint=single_ckpt, device="cpu")

    pair = tiny_config(root, tiny_clip_config, batch_size=b, iters=iters, checkpoint_interval=2)
    args = (2, free_port(), pair, tmp_path / "pair", single_ckpt, tmp_path / "eval2")
    mp.spawn(_worker, args=args, nprocs=2, join=True)

    a, c = trainable(single_ckpt), trainable(tmp_path / "pair" / "model_final.pt")
    moved = [k for k in a if not torch.equal(a[k], trainable(tmp_path / "single" / "ckpt_half.pt")[k])]
    assert moved, "training changed nothing"
    for k in a:
        x, y = a[k], c[k]
        if k.endswith("attn.in_proj_bias"):
            # The key bias's gradient is zero in exact arithmetic (softmax over keys ignores
            # a shift common to all keys), so AdamW normalises pure rounding noise there.
            x, y = x.view(3, -1)[[0, 2]], y.view(3, -1)[[0, 2]]
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=k)
    # only rank 0 wrote: one log record per step, not two
    log = [json.loads(line) for line in (tmp_path / "pair" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, iters + 1))
    # the pair's resumable checkpoint holds both ranks' RNG states
    assert len(torch.load(tmp_path / "pair" / "ckpt_last.pt", weights_only=True)["rng"]) == 2

    one = json.loads((tmp_path / "eval1" / "metrics.json").read_text())
    two = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["num_images"] == one["num_images"] == 3
    assert two["per_class_iou"] == one["per_class_iou"]
    assert (tmp_path / "eval1" / "per_class.csv").read_text() == (
        tmp_path / "eval2" / "per_class.csv"
    ).read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL, bf16 autocast, compiled Triton: GPU only")
def test_torchrun_on_gpu_trains_and_evaluates(tmp_path, tiny_clip_config):
    """The path `snakemake --resources gpu=N` takes: `torchrun -m cascade_clip.cli train`
    (NCCL process group, DDP, bf16 autocast, Triton kernels forced), then evaluate."""
    root = make_tiny_dataset(tmp_path / "data", n_train=7)
    cfg = tiny_config(root, tiny_clip_config, batch_size=2, iters=6, amp=True)
    config = str(write_config(cfg, tmp_path / "c.yaml"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    env = {**os.environ, "CASCADE_CLIP_KERNELS": "triton"}
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    ckpt = str(run_dir / "model_final.pt")
    for args in (
        ["train", "--config", config, "--out", str(run_dir)],
        ["evaluate", "--config", config, "--out", str(eval_dir), "--checkpoint", ckpt],
    ):
        cmd = [*torchrun, "-m", "cascade_clip.cli", *args]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and math.isfinite(metrics["miou_seen"])
