"""Four gloo processes of one image each make the same update as one process accumulating
four passes of one image (and so as one process with batch 4: tests/test_train.py), and
evaluate to the same confusion matrix as one process. On a GPU machine, the CLI under torchrun
trains and evaluates through NCCL, bf16 autocast and the Triton kernels."""

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


class Crash(Exception):
    pass


def _worker(rank: int, world: int, port: int, cfg, run_dir: Path, eval_ckpt: Path, eval_dir: Path,
            cut_cfg, cut_dir: Path) -> None:
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
    from cascade_clip.train.checkpointing import RunFiles

    torch.set_num_threads(1)  # two processes on a small shared machine: no oversubscription
    try:
        train(cfg, run_dir, device="cpu")
        evaluate(cfg, eval_dir, checkpoint=eval_ckpt, device="cpu")

        # A second run crashes after step 3 (ckpt_last.pt at step 2), then resumes while
        # rank 1's view of the shared folder has lost ckpt_last.pt (a stale entry): rank 0
        # decides, rank 1 cannot follow, and both stop with the same error.
        def crash(step: int) -> None:
            if step == 3:
                raise Crash

        try:
            train(cut_cfg, cut_dir, device="cpu", on_step=crash)
        except Crash:
            pass
        last = RunFiles.last
        if rank == 1:
            RunFiles.last = property(lambda files: files.dir / "stale" / "ckpt_last.pt")
        try:
            train(cut_cfg, cut_dir, device="cpu", resume=True)
        except ValueError as err:
            (cut_dir / f"error{rank}.txt").write_text(str(err))
        finally:
            RunFiles.last = last
    finally:
        cleanup()


def _assert_same_weights(a: dict, c: dict) -> None:
    for k in a:
        x, y = a[k], c[k]
        if k.endswith("attn.in_proj_bias"):
            # The key bias's gradient is zero in exact arithmetic (softmax over keys ignores
            # a shift common to all keys), so AdamW normalises pure rounding noise there.
            x, y = x.view(3, -1)[[0, 2]], y.view(3, -1)[[0, 2]]
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=k)


def test_four_processes_match_one_accumulating_four_passes(tmp_path, tiny_clip_config):
    """train.global_batch 4 with one image per pass: 4 gloo processes take one pass each, one
    process accumulates 4 (issue 32). The loss's normaliser (present image-class pairs) is the
    mean over ranks in one and over passes in the other, so every update is the same; the
    images hold 1 to 3 seen classes, so a normaliser per pass would differ. (One process with
    4 passes makes the update of one pass of 4 images: tests/test_train.py.) The 4 ranks
    evaluate to one process's confusion matrix, and a run they leave half done resumes on one
    process; rank 0 alone decides whether a run resumes (the others follow or every rank stops
    with one error)."""
    from cascade_clip.evaluate import evaluate
    from cascade_clip.train import train

    root = make_tiny_dataset(tmp_path / "data", n_train=7)
    iters, world = 3, 4
    one_a_pass = {"batch_size": 1, "global_batch": 4}
    cfg = tiny_config(root, tiny_clip_config, iters=iters, checkpoint_interval=2, **one_a_pass)
    single_ckpt = train(cfg, tmp_path / "single", device="cpu")
    evaluate(cfg, tmp_path / "eval1", checkpoint=single_ckpt, device="cpu")

    cut, cut_cfg = tmp_path / "cut", tiny_config(root, tiny_clip_config, iters=5, **one_a_pass)
    args = (world, free_port(), cfg, tmp_path / "four", single_ckpt, tmp_path / "eval2", cut_cfg, cut)
    mp.spawn(_worker, args=args, nprocs=world, join=True)

    a, c = trainable(single_ckpt), trainable(tmp_path / "four" / "model_final.pt")
    moved = [k for k in a if not torch.equal(a[k], trainable(tmp_path / "single" / "ckpt_half.pt")[k])]
    assert moved, "training changed nothing"
    _assert_same_weights(a, c)
    one = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    four = [json.loads(line) for line in (tmp_path / "four" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in four], rel=1e-5)
    # only rank 0 wrote: one log record per step, not four
    assert [r["step"] for r in four] == list(range(1, iters + 1))
    # the ranks' resumable checkpoint holds every rank's RNG state
    assert len(torch.load(tmp_path / "four" / "ckpt_last.pt", weights_only=True)["rng"]) == world

    m1 = json.loads((tmp_path / "eval1" / "metrics.json").read_text())
    m4 = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert m4["world_size"] == world and m4["num_images"] == m1["num_images"] == 3  # one rank has none
    assert m4["per_class_iou"] == m1["per_class_iou"]
    csv1, csv4 = ((tmp_path / e / "per_class.csv").read_text() for e in ("eval1", "eval2"))
    assert csv1 == csv4

    # The half-done run: rank 1 could not follow rank 0's resume, so none went on (before
    # issue 24 each rank decided alone: one resumed, the others started over), and nothing in
    # the folder was touched; resumed on one process (4 passes a step), it continues from step 2.
    errors = [(cut / f"error{r}.txt").read_text() for r in range(world)]
    assert all("ckpt_last.pt: rank 0 resumes from step 2, but rank 1 cannot read it" in e for e in errors)
    assert torch.load(cut / "ckpt_last.pt", weights_only=True)["step"] == 2
    log = [json.loads(line) for line in (cut / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    train(cut_cfg, cut, resume=True, device="cpu")
    log = [json.loads(line) for line in (cut / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r for r in log if "event" in r] == [
        {"step": 2, "event": "resume", "world_size": 1, "saved_world_size": world}
    ]


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
