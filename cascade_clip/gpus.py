"""Give concurrent Snakemake jobs distinct GPUs.

Snakemake counts `resources: gpu=N` but hands a job no device ids, so two jobs running at
once would both see every GPU. `cascade-clip gpu-run --gpus N -- CMD` takes an exclusive
lock on N free GPUs (one lock file per device, fcntl.flock, so a crashed job frees its
GPUs), runs CMD with CUDA_VISIBLE_DEVICES naming exactly those, and releases them when CMD
exits: SIGINT, SIGTERM and SIGHUP to gpu-run are passed on to CMD (once: CMD runs in a process
group of its own) and gpu-run goes on waiting for it, so no job outlives its locks. With N = 0
it runs CMD as is, hiding every GPU.

The pool the N come from is the CUDA_VISIBLE_DEVICES gpu-run inherits, when it is set: a
scheduler (SLURM, a container runtime) that gave this job `4,5,6,7`, or GPU/MIG UUIDs, gave
it those devices and no others, so gpu-run hands a child a subset of those entries exactly as
written, never renumbered to `0..N-1` (which would be someone else's GPUs). Only when it is
unset is the pool every GPU of the machine (CASCADE_CLIP_NUM_GPUS, else torch's count). An
empty value means no GPUs, as it does to CUDA.

The locks are per user: they live in `$XDG_RUNTIME_DIR/cascade-clip-gpu-locks`, else in
`/tmp/cascade-clip-gpu-locks-<uid>` (CASCADE_CLIP_GPU_LOCKS overrides both), a folder of mode
0700 that must belong to the user, because anyone who can write the folder can delete or
pre-create lock files and so hand one GPU to two jobs. Each lock file is named after the
device's id as the pool spells it, so a GPU spelt two ways (`3` and its UUID) gets two locks:
jobs that share GPUs must agree on how they name them. Two users on one machine therefore do
not see each other's locks; keeping their jobs off the same GPU is the scheduler's job (SLURM
gives each job its own CUDA_VISIBLE_DEVICES), which is why gpu-run honours the inherited
assignment rather than counting GPUs itself.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from cascade_clip.errors import InputError

LOCK_DIR_NAME = "cascade-clip-gpu-locks"


class GpuLockDirError(InputError):
    """The lock folder is unsafe to use (a ValueError, so the CLI prints it in one line)."""


def visible_gpu_count() -> int:
    """GPUs on this machine: CASCADE_CLIP_NUM_GPUS if set, else what torch sees."""
    if "CASCADE_CLIP_NUM_GPUS" in os.environ:
        return int(os.environ["CASCADE_CLIP_NUM_GPUS"])
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def parse_visible_devices(value: str) -> list[str]:
    """The entries of a CUDA_VISIBLE_DEVICES value, kept as written and in order.

    CUDA stops at the first invalid entry, so `-1` (the usual way to hide every GPU) ends the
    list here too; a repeated entry is kept once, since locking it twice would deadlock.
    """
    devices: list[str] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        if entry.startswith("-"):
            break
        if entry not in devices:
            devices.append(entry)
    return devices


def gpu_pool(environ: Mapping[str, str] | None = None) -> list[str]:
    """The device ids a job may take: the inherited CUDA_VISIBLE_DEVICES, else every GPU."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return parse_visible_devices(environ["CUDA_VISIBLE_DEVICES"])
    return [str(i) for i in range(visible_gpu_count())]


def pool_origin(environ: Mapping[str, str] | None = None) -> str:
    """Where gpu_pool took the pool from, for error messages."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return f"the inherited CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r}"
    if "CASCADE_CLIP_NUM_GPUS" in environ:
        return f"CASCADE_CLIP_NUM_GPUS={environ['CASCADE_CLIP_NUM_GPUS']}"
    return "the GPUs torch sees (CUDA_VISIBLE_DEVICES is unset)"


def default_lock_dir(environ: Mapping[str, str] | None = None) -> Path:
    """CASCADE_CLIP_GPU_LOCKS, else the user's runtime folder, else a per-uid folder in /tmp.

    XDG_RUNTIME_DIR counts only when it exists: a batch job can inherit the login node's
    `/run/user/<uid>`, which the compute node does not have. Inside a SLURM job the folder
    name carries the job id.
    """
    environ = os.environ if environ is None else environ
    if environ.get("CASCADE_CLIP_GPU_LOCKS"):
        return Path(environ["CASCADE_CLIP_GPU_LOCKS"])
    # Inside a SLURM job the locks are the job's own: SLURM already keeps jobs apart, and
    # with device cgroups it renumbers each job's GPUs from 0, so two jobs of one user would
    # otherwise wait on each other's "0" though it is another physical GPU.
    name = LOCK_DIR_NAME + (f"-slurm{environ['SLURM_JOB_ID']}" if environ.get("SLURM_JOB_ID") else "")
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return Path(runtime) / name
    return Path("/tmp") / f"{name}-{os.geteuid()}"


def ensure_lock_dir(lock_dir: Path, uid: int | None = None) -> Path:
    """Create `lock_dir` (mode 0700) if needed and refuse it unless only `uid` can write it.

    lstat, not stat: a symlink planted in /tmp by someone else is refused rather than followed.
    """
    uid = os.geteuid() if uid is None else uid
    try:
        lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(lock_dir)
    except OSError as err:
        raise GpuLockDirError(f"cannot use GPU lock folder {lock_dir}: {err.strerror}") from err
    if not stat.S_ISDIR(info.st_mode):
        raise GpuLockDirError(f"GPU lock folder {lock_dir} is not a folder (a symlink?); refusing it")
    if info.st_uid != uid:
        raise GpuLockDirError(
            f"GPU lock folder {lock_dir} belongs to uid {info.st_uid}, not to you (uid {uid}); "
            "refusing it (set CASCADE_CLIP_GPU_LOCKS to a folder of your own)"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise GpuLockDirError(
            f"GPU lock folder {lock_dir} is writable by others (mode {stat.S_IMODE(info.st_mode):o}); "
            f"refusing it (chmod 700 {lock_dir})"
        )
    return lock_dir


def lock_file_name(device: str) -> str:
    """A file name for `device` that is safe and distinct for any id.

    MIG ids can hold `/` (`MIG-GPU-<uuid>/1/0`); percent-encoding everything but letters,
    digits and `-._~` keeps the name inside the folder and two different ids apart.
    """
    return f"gpu-{quote(device, safe='')}.lock"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def acquire_gpus(
    count: int,
    pool: Sequence[str] | None = None,
    lock_dir: Path | None = None,
    timeout: float = 7 * 24 * 3600,
    poll: float = 1.0,
) -> Iterator[list[str]]:
    """Hold exclusive locks on `count` devices of `pool` (default: gpu_pool()).

    Yields the held entries as the pool spells them, in pool order.
    """
    if count < 0:
        raise InputError(f"cannot ask for {count} GPUs")
    if count == 0:  # nothing to look up: finding the pool imports torch (~4 CPU-s a job on CPU)
        yield []
        return
    if pool is None:
        pool, origin = gpu_pool(), pool_origin()
    else:
        pool, origin = list(dict.fromkeys(pool)), "the given pool"
    if count > len(pool):
        listed = ",".join(pool) or "none"
        raise InputError(f"asked for {count} GPUs but the pool has {len(pool)} ({listed}, from {origin})")
    lock_dir = ensure_lock_dir(default_lock_dir() if lock_dir is None else lock_dir)
    held: list[tuple[str, int]] = []  # (device, fd)
    deadline = time.monotonic() + timeout
    try:
        while len(held) < count:
            for device in pool:
                if len(held) == count:
                    break
                fd = _try_lock(lock_dir / lock_file_name(device))
                if fd is not None:
                    held.append((device, fd))
            if len(held) < count:
                # Take all or nothing, so two jobs each holding half cannot deadlock.
                for _, fd in held:
                    os.close(fd)
                held.clear()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {count} free GPUs within {timeout:.0f} s")
                time.sleep(poll)
        yield [device for device, _ in held]
    finally:
        for _, fd in held:
            os.close(fd)


# Signals gpu-run passes on to its job and then waits: the job stops in its own way (torchrun
# stops its workers, a trainer keeps its checkpoint) while its GPUs stay locked.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_on_gpus(
    count: int,
    command: Sequence[str],
    pool: Sequence[str] | None = None,
    lock_dir: Path | None = None,
) -> int:
    """Run `command` with CUDA_VISIBLE_DEVICES set to `count` GPUs locked for its lifetime.

    The locks outlive the job. It runs in a process group of its own, so a signal to gpu-run's
    group (Ctrl-C in a terminal) reaches only gpu-run, which passes SIGINT, SIGTERM and SIGHUP
    on to the job's group exactly once and waits until the job has exited, whatever it does
    with them (torchrun stops its workers on the first and gives up on a second). On Linux,
    a gpu-run killed outright takes its job with it (SIGTERM). Returns the job's exit status
    (128 + N when signal N ended it, as a shell reports it).
    """
    if not command:
        raise InputError("gpu-run needs a command after --")
    with acquire_gpus(count, pool=pool, lock_dir=lock_dir) as gpus:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(gpus))
        with _forwarding_signals() as forward:
            job = subprocess.Popen(list(command), env=env, process_group=0, preexec_fn=_die_with_parent())
            forward(job)
            status = job.wait()  # PEP 475: a handled signal does not cut the wait short
    return 128 - status if status < 0 else status


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when gpu-run dies (None elsewhere)."""
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return preexec


@contextmanager
def _forwarding_signals() -> Iterator[Callable[[subprocess.Popen], None]]:
    """Handlers that pass FORWARDED_SIGNALS on to the process group of the job given to the
    yielded callable (a signal that arrives before the job exists is passed on as it starts);
    the previous handlers are restored after."""
    job: list[subprocess.Popen] = []
    pending: list[int] = []

    def send(signum: int) -> None:
        if job[0].returncode is not None:  # reaped: its group id may be someone else's now
            return
        try:
            os.killpg(job[0].pid, signum)
        except ProcessLookupError:  # the job has just exited
            pass

    def handler(signum: int, frame: object) -> None:
        if job:
            send(signum)
        else:
            pending.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in FORWARDED_SIGNALS}

    def forward(process: subprocess.Popen) -> None:
        job.append(process)
        for signum in pending:
            send(signum)

    try:
        yield forward
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
