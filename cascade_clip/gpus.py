"""Give concurrent Snakemake jobs distinct GPUs.

Snakemake counts `resources: gpu=N` but hands a job no device ids, so two jobs running at
once would both see every GPU. `cascade-clip gpu-run --gpus N -- CMD` takes an exclusive
lock on N free GPUs (one lock file per device, fcntl.flock, so a crashed job frees its
GPUs), runs CMD with CUDA_VISIBLE_DEVICES naming exactly those, and releases them when CMD
exits. With N = 0 it runs CMD as is, hiding every GPU.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

DEFAULT_LOCK_DIR = Path(os.environ.get("CASCADE_CLIP_GPU_LOCKS", "/tmp/cascade-clip-gpu-locks"))


def visible_gpu_count() -> int:
    """GPUs on this machine: CASCADE_CLIP_NUM_GPUS if set, else what torch sees."""
    if "CASCADE_CLIP_NUM_GPUS" in os.environ:
        return int(os.environ["CASCADE_CLIP_NUM_GPUS"])
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


@contextmanager
def acquire_gpus(
    count: int,
    total: int | None = None,
    lock_dir: Path = DEFAULT_LOCK_DIR,
    timeout: float = 7 * 24 * 3600,
    poll: float = 1.0,
):
    """Hold exclusive locks on `count` of the `total` GPUs; yields their ids (sorted)."""
    total = visible_gpu_count() if total is None else total
    if count < 0:
        raise ValueError(f"cannot ask for {count} GPUs")
    if count > total:
        raise ValueError(f"asked for {count} GPUs but this machine has {total}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    held: list[tuple[int, int]] = []  # (gpu id, fd)
    deadline = time.monotonic() + timeout
    try:
        while len(held) < count:
            for gpu in range(total):
                if len(held) == count:
                    break
                if any(g == gpu for g, _ in held):
                    continue
                fd = os.open(lock_dir / f"gpu{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                held.append((gpu, fd))
            if len(held) < count:
                # Take all or nothing, so two jobs each holding half cannot deadlock.
                for _, fd in held:
                    os.close(fd)
                held.clear()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {count} free GPUs within {timeout:.0f} s")
                time.sleep(poll)
        yield sorted(g for g, _ in held)
    finally:
        for _, fd in held:
            os.close(fd)


def run_on_gpus(
    count: int, command: Sequence[str], total: int | None = None, lock_dir: Path = DEFAULT_LOCK_DIR
) -> int:
    """Run `command` with CUDA_VISIBLE_DEVICES set to `count` GPUs locked for its lifetime."""
    if not command:
        raise ValueError("gpu-run needs a command after --")
    with acquire_gpus(count, total=total, lock_dir=lock_dir) as gpus:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, gpus)))
        return subprocess.call(list(command), env=env)
