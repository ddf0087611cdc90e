"""One process per GPU under `torchrun`, or a single process without it.

`torchrun --nproc-per-node N` sets RANK, WORLD_SIZE and LOCAL_RANK (plus MASTER_ADDR and
MASTER_PORT) for every process it starts; `init_distributed` reads them, joins the process
group (NCCL on GPU, gloo on CPU) and pins the process to its GPU. Run without torchrun, it
returns a world of one and every helper here becomes a no-op, so the training and
evaluation code reads the same either way.

`ShardedInfiniteSampler` is the deterministic, resumable equivalent of
DistributedSampler for iteration-based training: one endless stream of epoch
permutations, dealt round-robin to the ranks.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cascade_clip.errors import InputError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank in 0..world_size-1 and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the torchrun process group if there is one; pick this process's device.

    `device` forces "cpu" or "cuda"; by default a GPU is used when one is visible. With
    WORLD_SIZE > 1 the backend is NCCL on GPU and gloo on CPU. Calling it again in a
    process that already joined returns the same DistEnv.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no GPU is visible")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            device_id=dev if use_cuda else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all ranks (a new tensor; the input is left alone)."""
    out = tensor.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all ranks, in floating point."""
    out = all_reduce_sum(tensor.float() if not tensor.is_floating_point() else tensor)
    return out / get_world_size()


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of `tensor` over all ranks (a new tensor)."""
    out = tensor.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DistributedDataParallel around `module` (gradients averaged over ranks), without
    re-broadcasting buffers every forward: ours are fixed, seeded tap projections that
    every rank builds identically (DDP still syncs them once at construction)."""
    kwargs: dict[str, Any] = {"device_ids": [env.device.index] if env.device.type == "cuda" else None}
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters:
        kwargs["forward_sync_buffers"] = False  # newer torch: broadcast_buffers is deprecated
    else:
        kwargs["broadcast_buffers"] = False
    return torch.nn.parallel.DistributedDataParallel(module, **kwargs)


class ShardedInfiniteSampler(torch.utils.data.Sampler):
    """An endless, deterministic stream of dataset indices, dealt round-robin to ranks.

    The global stream is permutation(epoch 0) + permutation(epoch 1) + ..., each drawn
    from a generator seeded with (seed, epoch), so it never depends on the number of
    ranks or on how far a previous run got. Rank r takes global items r, r + W, r + 2W, ...
    One step of W ranks with batch b each thus consumes the same W*b items as one process
    with batch W*b, which is what makes a multi-GPU run equal a single-GPU one.

    Resuming: `start` is the number of *global* items already consumed (step * b * W);
    the stream continues exactly where it stopped.
    """

    def __init__(
        self,
        size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start: int = 0,
        shuffle: bool = True,
    ):
        if size <= 0:
            raise InputError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} outside 0..{world_size - 1}")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.start, self.shuffle = seed, start, shuffle

    def _epoch(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=gen)

    def global_items(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """(global position, dataset index) from position `start` on, forever."""
        pos = start
        epoch, offset = divmod(start, self.size)
        while True:
            perm = self._epoch(epoch).tolist()
            for index in perm[offset:]:
                yield pos, index
                pos += 1
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Yields (global position, dataset index); the position seeds that item's
        augmentation (see `cascade_clip.train.SeededItems`)."""
        for pos, index in self.global_items(self.start):
            if (pos - self.rank) % self.world_size == 0:
                yield pos, index

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62


def loader_workers(setting: int | str, max_workers: int = 4) -> int:
    """DataLoader worker processes for this process: `setting` as given, or for "auto" the
    cores this process may use less one (the main process decodes nothing but drives the
    step), at most `max_workers`.

    The cores: this process's CPU affinity, capped by OMP_NUM_THREADS (what Snakemake
    grants the job), shared by the LOCAL_WORLD_SIZE processes torchrun starts on the node.
    """
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    granted = _env_int("OMP_NUM_THREADS", 0)  # the workflow's rules set it to the job's threads
    if granted > 0:
        cores = min(cores, granted)
    per_process = max(1, cores // max(1, _env_int("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(max_workers, per_process - 1))
