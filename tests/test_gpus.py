"""Concurrent jobs get distinct GPUs (no GPU needed: the locks are what is tested)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cascade_clip import cli
from cascade_clip.gpus import (
    GpuLockDirError,
    acquire_gpus,
    default_lock_dir,
    ensure_lock_dir,
    gpu_pool,
    lock_file_name,
    run_on_gpus,
)

FOUR = ["0", "1", "2", "3"]
UUIDS = [
    "GPU-8f3c2a1e-5b6d-4c7e-9f80-1a2b3c4d5e6f",
    "MIG-GPU-8f3c2a1e-5b6d-4c7e-9f80-1a2b3c4d5e6f/1/0",  # the pre-R470 MIG form, with slashes
    "MIG-0b1c2d3e-4f50-5162-7384-95a6b7c8d9e0",
]


def write_devices(out: Path) -> list[str]:
    """A child command that writes the CUDA_VISIBLE_DEVICES it was given to `out`."""
    code = f"import os; open({str(out)!r}, 'w').write(repr(os.environ['CUDA_VISIBLE_DEVICES']))"
    return [sys.executable, "-c", code]


def gpu_run_env(tmp_path: Path, visible: str) -> dict[str, str]:
    """The environment of a `cascade-clip gpu-run` that a scheduler gave the GPUs `visible`."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible, CASCADE_CLIP_GPU_LOCKS=str(tmp_path / "locks"))
    env.pop("CASCADE_CLIP_NUM_GPUS", None)
    return env


def wait_for(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def test_two_holders_get_disjoint_gpus(tmp_path):
    with acquire_gpus(2, pool=FOUR, lock_dir=tmp_path) as a:
        with acquire_gpus(2, pool=FOUR, lock_dir=tmp_path) as b:
            assert len(a) == len(b) == 2
            assert not set(a) & set(b)
            with pytest.raises(TimeoutError):
                with acquire_gpus(1, pool=FOUR, lock_dir=tmp_path, timeout=0.2, poll=0.05):
                    pass
    with acquire_gpus(4, pool=FOUR, lock_dir=tmp_path) as c:  # all released again
        assert c == FOUR


def test_too_many_gpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"asked for 3 GPUs but the pool has 2 \(5,7, from the given pool\)"):
        with acquire_gpus(3, pool=["5", "7"], lock_dir=tmp_path):
            pass


def test_concurrent_processes_see_distinct_devices(tmp_path):
    """Four jobs of 2 GPUs on a 4-GPU machine: at most two run at once, never sharing."""
    log = tmp_path / "log"
    script = (
        "import os, sys, time; from pathlib import Path; "
        "from cascade_clip.gpus import run_on_gpus; "
        f"cmd = [sys.executable, '-c', \"import os, time; "
        f"open({str(log)!r}, 'a').write(os.environ['CUDA_VISIBLE_DEVICES'] + ' ' + "
        "str(time.monotonic()) + '\\\\n'); time.sleep(0.4); "
        f"open({str(log)!r}, 'a').write(os.environ['CUDA_VISIBLE_DEVICES'] + ' end ' + "
        "str(time.monotonic()) + '\\\\n')\"]; "
        f"sys.exit(run_on_gpus(2, cmd, pool={FOUR!r}, lock_dir=Path({str(tmp_path / 'locks')!r})))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(4)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    events = []
    for line in log.read_text().splitlines():
        parts = line.split()
        devices = set(parts[0].split(","))
        assert len(devices) == 2
        events.append((float(parts[-1]), parts[1] != "end", frozenset(devices)))
    running: list[frozenset] = []
    for _, start, devices in sorted(events, key=lambda e: (e[0], e[1])):
        if start:
            assert all(not (devices & other) for other in running)
            running.append(devices)
        else:
            running.remove(devices)


def test_zero_gpus_hides_all(tmp_path):
    out = tmp_path / "out"
    assert run_on_gpus(0, write_devices(out), pool=[], lock_dir=tmp_path) == 0
    assert out.read_text() == "''"


def test_zero_gpus_look_up_no_pool(monkeypatch, tmp_path):
    """`gpu-run --gpus 0` (every job on a CPU machine) never asks torch for the GPU count:
    importing torch cost each such job ~4 CPU-seconds before its command even started."""
    import cascade_clip.gpus as gpus

    def no_lookup():
        raise AssertionError("gpu-run --gpus 0 looked up the GPU pool")

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpus, "visible_gpu_count", no_lookup)
    out = tmp_path / "out"
    assert run_on_gpus(0, write_devices(out), lock_dir=tmp_path) == 0
    assert out.read_text() == "''"


def test_gpu_run_takes_gpus_from_the_inherited_assignment(tmp_path):
    """SLURM gave the job 4,5,6,7: two concurrent `gpu-run --gpus 2` split exactly those."""
    first, second, release = tmp_path / "first", tmp_path / "second", tmp_path / "release"
    hold = (
        f"import os, time; open({str(first)!r}, 'w').write(os.environ['CUDA_VISIBLE_DEVICES']); "
        f"[time.sleep(0.02) for _ in range(3000) if not os.path.exists({str(release)!r})]"
    )
    gpu_run = [sys.executable, "-m", "cascade_clip.cli", "gpu-run", "--gpus", "2", "--"]
    env = gpu_run_env(tmp_path, "4,5,6,7")
    holder = subprocess.Popen([*gpu_run, sys.executable, "-c", hold], env=env)
    try:
        got_first = wait_for(first).split(",")
        assert subprocess.run([*gpu_run, *write_devices(second)], env=env, timeout=60).returncode == 0
        got_second = second.read_text()
    finally:
        release.touch()
        assert holder.wait(timeout=60) == 0
    assert got_first == ["4", "5"]  # the pool's first free entries, in order, not renumbered
    assert got_second == repr("6,7")


def test_uuid_ids_are_passed_through_and_locked(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(UUIDS))
    locks, out = tmp_path / "locks", tmp_path / "out"
    assert gpu_pool() == UUIDS
    with acquire_gpus(2, lock_dir=locks) as held:
        assert held == UUIDS[:2]
        assert run_on_gpus(1, write_devices(out), lock_dir=locks) == 0  # only the third is free
        assert out.read_text() == repr(UUIDS[2])
        with pytest.raises(TimeoutError):
            with acquire_gpus(2, lock_dir=locks, timeout=0.1, poll=0.02):
                pass
    names = sorted(p.name for p in locks.iterdir())
    assert names == sorted(lock_file_name(u) for u in UUIDS)  # one file per device, all in locks/


def test_lock_file_names_are_safe_and_distinct():
    ids = [*UUIDS, "MIG-GPU-8f3c2a1e-5b6d-4c7e-9f80-1a2b3c4d5e6f_1_0", "a/b", "a%2Fb", "..", "a b"]
    names = [lock_file_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    for name in names:
        assert "/" not in name and not name.startswith(".") and " " not in name
        assert Path(name).name == name


def test_too_many_for_the_inherited_pool_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setenv("CASCADE_CLIP_GPU_LOCKS", str(tmp_path))
    assert cli.main(["gpu-run", "--gpus", "5", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "asked for 5 GPUs but the pool has 4 (4,5,6,7" in err
    assert "CUDA_VISIBLE_DEVICES='4,5,6,7'" in err


def test_empty_inherited_value_means_no_gpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("CASCADE_CLIP_NUM_GPUS", "4")  # the machine has GPUs, the job was given none
    monkeypatch.setenv("CASCADE_CLIP_GPU_LOCKS", str(tmp_path / "locks"))
    assert gpu_pool() == []
    assert cli.main(["gpu-run", "--gpus", "1", "--", "true"]) == 2
    assert "asked for 1 GPUs but the pool has 0 (none" in capsys.readouterr().err
    out = tmp_path / "out"
    assert cli.main(["gpu-run", "--gpus", "0", "--", *write_devices(out)]) == 0
    assert out.read_text() == "''"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # CUDA's other spelling of "none"
    assert gpu_pool() == []


def test_unset_assignment_means_every_gpu_of_the_machine(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("CASCADE_CLIP_NUM_GPUS", "3")
    assert gpu_pool() == ["0", "1", "2"]


def test_default_lock_dir_is_per_user(tmp_path, monkeypatch):
    assert default_lock_dir({}) == Path(f"/tmp/cascade-clip-gpu-locks-{os.geteuid()}")
    assert default_lock_dir({"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "cascade-clip-gpu-locks"
    missing = {"XDG_RUNTIME_DIR": str(tmp_path / "not-on-this-node")}
    assert default_lock_dir(missing) == Path(f"/tmp/cascade-clip-gpu-locks-{os.geteuid()}")
    override = {"XDG_RUNTIME_DIR": str(tmp_path), "CASCADE_CLIP_GPU_LOCKS": str(tmp_path / "mine")}
    assert default_lock_dir(override) == tmp_path / "mine"
    # SLURM jobs each get their own folder: their GPUs may all be numbered from 0
    job = {"XDG_RUNTIME_DIR": str(tmp_path), "SLURM_JOB_ID": "4242"}
    assert default_lock_dir(job) == tmp_path / "cascade-clip-gpu-locks-slurm4242"
    tmp_job = Path(f"/tmp/cascade-clip-gpu-locks-slurm7-{os.geteuid()}")
    assert default_lock_dir({"SLURM_JOB_ID": "7"}) == tmp_job

    # With no lock_dir given, acquire_gpus creates the runtime-dir folder, mode 0700.
    monkeypatch.delenv("CASCADE_CLIP_GPU_LOCKS", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with acquire_gpus(1, pool=["7"]):
        pass
    locks = tmp_path / "cascade-clip-gpu-locks"
    assert stat.S_IMODE(locks.stat().st_mode) == 0o700
    assert [p.name for p in locks.iterdir()] == [lock_file_name("7")]


def test_unsafe_lock_dirs_are_refused(tmp_path, capsys, monkeypatch):
    fresh = ensure_lock_dir(tmp_path / "fresh")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700

    with pytest.raises(GpuLockDirError, match="belongs to uid"):
        ensure_lock_dir(fresh, uid=os.geteuid() + 1)

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # what /tmp/cascade-clip-gpu-locks used to be
    with pytest.raises(GpuLockDirError, match="writable by others"):
        ensure_lock_dir(shared)
    shared.chmod(0o770)
    with pytest.raises(GpuLockDirError, match="writable by others"):
        ensure_lock_dir(shared)

    link = tmp_path / "link"
    link.symlink_to(fresh)
    with pytest.raises(GpuLockDirError, match="not a folder"):
        ensure_lock_dir(link)

    # Through the CLI, a refused folder is one error line, and the command never runs.
    shared.chmod(0o777)
    monkeypatch.setenv("CASCADE_CLIP_GPU_LOCKS", str(shared))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    out = tmp_path / "out"
    assert cli.main(["gpu-run", "--gpus", "1", "--", *write_devices(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another user")
def test_lock_dir_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(GpuLockDirError, match="belongs to uid 65534"):
        with acquire_gpus(1, pool=["0"], lock_dir=theirs):
            pass


# --- a job's GPUs stay locked until the job is gone (issue 24) -------------------------------

# A job that needs a moment to stop: each SIGINT or SIGTERM it gets is appended to `got`; on the
# first it goes on for 1 s (a trainer saving its state, torchrun stopping its workers), writes
# `done` and exits 3.
SLOW_TO_STOP = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def stop(signum, frame):
    with open(out / "got", "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    if signum != signal.SIGINT or not (out / "stopping").exists():
        (out / "stopping").touch()
        time.sleep(1.0)
        (out / "done").touch()
        sys.exit(3)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
(out / "pid").write_text(str(os.getpid()))
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start_slow_job(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """`cascade-clip gpu-run --gpus 1 -- SLOW_TO_STOP` in a process group of its own (as a
    terminal runs a command), and the job's pid once it runs."""
    script = tmp_path / "job.py"
    script.write_text(SLOW_TO_STOP)
    gpu_run = subprocess.Popen(
        [sys.executable, "-m", "cascade_clip.cli", "gpu-run", "--gpus", "1", "--", sys.executable,
         str(script), str(tmp_path)], env=gpu_run_env(tmp_path, "0"), process_group=0)
    return gpu_run, int(wait_for(tmp_path / "pid"))


@pytest.mark.parametrize("how", ["SIGINT to the group", "SIGTERM to gpu-run"])
def test_gpu_run_forwards_a_signal_and_holds_the_gpus_until_its_job_exits(tmp_path, how):
    """Ctrl-C in a terminal (SIGINT to the whole process group) or SIGTERM to gpu-run reaches
    the job exactly once, and gpu-run waits for the job with its GPU still locked (no second
    job gets it meanwhile); nothing outlives it. Before issue 24, SIGTERM left the job running
    with its GPU unlocked, and SIGINT SIGKILLed the job."""
    import signal

    name, target = how.split(" to ")
    gpu_run, child = _start_slow_job(tmp_path)
    try:
        signum = getattr(signal, name)
        if target == "the group":
            os.killpg(gpu_run.pid, signum)
        else:
            gpu_run.send_signal(signum)
        assert wait_for(tmp_path / "stopping", timeout=10) == ""
        assert gpu_run.poll() is None  # still waiting for its job
        with pytest.raises(TimeoutError):  # ... and still holding its GPU
            with acquire_gpus(1, pool=["0"], lock_dir=tmp_path / "locks", timeout=0.1, poll=0.05):
                pass
        assert gpu_run.wait(timeout=30) == 3  # the job's own exit status
        assert (tmp_path / "got").read_text().split() == [name]  # once, not twice
        assert (tmp_path / "done").exists() and not _alive(child)
        with acquire_gpus(1, pool=["0"], lock_dir=tmp_path / "locks", timeout=5, poll=0.05):
            pass
    finally:
        gpu_run.kill()
        if _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_killed_gpu_run_takes_its_job_with_it(tmp_path):
    import signal

    gpu_run, child = _start_slow_job(tmp_path)
    try:
        gpu_run.kill()
        gpu_run.wait(timeout=10)
        assert wait_for(tmp_path / "done", timeout=10) == ""
        assert (tmp_path / "got").read_text().split() == ["SIGTERM"]
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
