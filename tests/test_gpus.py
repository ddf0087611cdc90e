"""Concurrent jobs get distinct GPUs (no GPU needed: the locks are what is tested)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cascade_clip.gpus import acquire_gpus, run_on_gpus


def test_two_holders_get_disjoint_gpus(tmp_path):
    with acquire_gpus(2, total=4, lock_dir=tmp_path) as a:
        with acquire_gpus(2, total=4, lock_dir=tmp_path) as b:
            assert len(a) == len(b) == 2
            assert not set(a) & set(b)
            with pytest.raises(TimeoutError):
                with acquire_gpus(1, total=4, lock_dir=tmp_path, timeout=0.2, poll=0.05):
                    pass
    with acquire_gpus(4, total=4, lock_dir=tmp_path) as c:  # all released again
        assert c == [0, 1, 2, 3]


def test_too_many_gpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="asked for 3 GPUs but this machine has 2"):
        with acquire_gpus(3, total=2, lock_dir=tmp_path):
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
        f"sys.exit(run_on_gpus(2, cmd, total=4, lock_dir=Path({str(tmp_path / 'locks')!r})))"
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
    cmd = [
        sys.executable,
        "-c",
        f"import os; open({str(out)!r}, 'w').write(repr(os.environ['CUDA_VISIBLE_DEVICES']))",
    ]
    assert run_on_gpus(0, cmd, total=0, lock_dir=tmp_path) == 0
    assert out.read_text() == "''"
