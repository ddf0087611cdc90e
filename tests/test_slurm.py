"""The workflow on a real SLURM cluster, the way README's "On a SLURM cluster" says to run it.

A two-node SLURM runs on this machine for the module (tests/slurm_cluster.py: munged,
slurmctld and two slurmd, owned by the test, stopped at the end with nothing left running).
Partitions `cpu` and `gpu` exist, as the shipped profile names them, so the profile is used
unchanged: `snakemake --workflow-profile workflow/profiles/slurm` with the executor plugin,
plus `--slurm-status-command squeue` (the cluster has no slurmdbd, so no `sacct`) and a
one-second status poll (the test's only speed-up).

1. The tiny shapes workflow runs through SLURM while the same config runs locally beside it:
   every rule of the DAG ran as its own SLURM job (the executor's job comment names the rule;
   slurmctld's jobcomp log has one COMPLETED line per job), and the SLURM run's weights,
   confusion matrices and mIoUs equal the local run's.
2. Meanwhile, as soon as the local run is done, its folder is retrained through SLURM with
   `workflow.train_nodes: 2`: the train job spans both nodes (srun starts a torchrun through
   each slurmd, gloo on CPU, world size 2), is `scancel`led between two checkpoints, and
   `snakemake --unlock` and a rerun with `--rerun-incomplete` resume it from ckpt_last.pt,
   its half-way checkpoint and every logged step kept.

The three run side by side because a SLURM run is mostly waiting: each job pays two Snakemake
start-ups and the executor's status poll, which grows by 10 s after every check that found
nothing finished. Wall time on the 2-core VM while other work shared it (load 4-6): 402 to
464 s for the module (local run ~180-240 s, SLURM run ~285-420 s, the two-node kill and
resume ~110-180 s of it overlapping the SLURM run); the jobs themselves are seconds of work.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from slurm_cluster import SlurmCluster, missing_binaries
from test_recovery import kill_tree as kill_pid_tree
from test_workflow import ROOT, _tiny_config

PROFILE = ROOT / "workflow" / "profiles" / "slurm"
# README: a cluster without slurmdbd asks squeue for job states.
STATUS_ARGS = ["--slurm-status-command", "squeue"]
# Poll every second instead of 40 s (the executor's default): only to keep the test short.
POLL_ARGS = ["--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1"]
ITERS, HALF, EVERY = 240, 120, 20  # the two-node run that is cancelled and resumed


def _missing() -> list[str]:
    missing = missing_binaries()
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        missing.append("snakemake-executor-plugin-slurm")
    if os.geteuid() != 0:
        missing.append("root (the test's slurmd runs jobs as root)")
    return missing


MISSING = _missing()
IN_CI = bool(os.environ.get("CI"))  # .ci/run installs SLURM: there a missing piece is a failure

# The tests that start the cluster: slow, and skipped (outside CI) where SLURM is missing.
needs_slurm = pytest.mark.skipif(
    bool(MISSING) and not IN_CI,
    reason=f"needs {', '.join(MISSING)}: apt-get install slurm-wlm munge; pip install -e '.[dev]'",
)


def snakemake(work: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), *args]


def on_slurm(work: Path, *args: str) -> list[str]:
    """The README's command: the shipped profile, squeue for job states."""
    return snakemake(work, "--workflow-profile", str(PROFILE), *STATUS_ARGS, *POLL_ARGS, *args)


def kill_tree(proc: subprocess.Popen) -> None:
    kill_pid_tree(proc.pid)


def wait(proc: subprocess.Popen, timeout: float, what: str, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"{what} did not finish in {timeout:.0f} s:\n{tail(log)}")


def wait_for_failure(proc: subprocess.Popen, out: Path, job_id: str, timeout: float = 180) -> int:
    """Snakemake's exit after it reported the failed SLURM job. It sleeps through one more
    status interval (the executor's poll, ~30-60 s by then) before it says it is exiting:
    once it has reported the job, Ctrl-C it, as an impatient user would."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if f"SLURM-job '{job_id}' failed" in out.read_text(errors="replace"):
            try:
                return proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                return wait(proc, 60, "snakemake after Ctrl-C", out)
        time.sleep(0.2)
    return wait(proc, 1, "snakemake after the scancel", out)


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


def rule_logs(results: Path) -> str:
    logs = sorted(results.rglob("*.log"))
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)


def write_config(work: Path, cfg: dict) -> None:
    (work / "config").mkdir(parents=True, exist_ok=True)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))


def tiny(work: Path) -> dict:
    cfg = _tiny_config(work / "results", work / "resources")
    cfg["pretrain"]["max_seconds"] = 3600  # the CLIP stops by its step count, never by the clock
    return cfg


def planned_rules(out: Path) -> Counter:
    """Rule name -> job count from the "Job stats" table a Snakemake run prints at its start."""
    text = out.read_text(errors="replace")
    table = text[text.index("Job stats:"):].split("\n\n")[0].splitlines()[3:]
    rules = Counter({name: int(count) for name, count in (row.split() for row in table)})
    del rules["total"], rules["all"]  # `all` is the target: no command, Snakemake finishes it
    return rules


def rule_of(comment: str) -> str:
    """The executor's job comment `rule_<rule>[_wildcards_<values>]` -> the rule."""
    assert comment.startswith("rule_"), comment
    return comment[len("rule_"):].split("_wildcards_")[0]


def step_of(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:  # not there yet, or being replaced
        return -1


@pytest.fixture(scope="module")
def cluster():
    if MISSING:
        pytest.fail(f"CI must install SLURM for this test (.ci/run); missing: {', '.join(MISSING)}")
    c = SlurmCluster()
    try:
        c.start()
        yield c
    finally:
        killed = c.stop()
        daemons, marked = c.daemon_processes(), c.marked_processes()
        logs = c.logs_tail()
        if not os.environ.get("CASCADE_CLIP_KEEP_SLURM"):
            shutil.rmtree(c.root, ignore_errors=True)
        assert not daemons and not marked, f"left running: {daemons} {marked}"
        # Every job ended through SLURM (completed or cancelled), not by the sweep.
        assert not killed, "processes of the cluster outlived its daemons:\n" + "\n".join(killed) + logs


def run_id(out: Path) -> str | None:
    """The executor's run id (every job it submits carries it as the job name)."""
    match = re.search(r"SLURM run ID: (\S+)", out.read_text(errors="replace")) if out.exists() else None
    return match.group(1) if match else None


def jobs_of(cluster: SlurmCluster, out: Path) -> dict[str, dict[str, str]]:
    """The jobs that the Snakemake run writing `out` submitted."""
    rid = run_id(out)
    return {j: v for j, v in cluster.jobs().items() if rid and v["name"] == rid}


def keep_reference(local: Path, ref: Path) -> None:
    """Copy what test 2 compares before the two-node run retrains the local folder's run."""
    src, dst = local / "results" / "shapes", ref / "results" / "shapes"
    shutil.copytree(src / "eval", dst / "eval")
    (dst / "runs" / "cascade").mkdir(parents=True)
    shutil.copy2(src / "runs" / "cascade" / "model_final.pt", dst / "runs" / "cascade")
    (dst / "report").mkdir()
    shutil.copy2(src / "report" / "summary.csv", dst / "report")


def kill_and_resume(work: Path, cluster: SlurmCluster) -> dict:
    """Retrain `work`'s run on two nodes through SLURM, scancel it between checkpoints,
    recover as a user would; what happened, for test 3 to check."""
    run = work / "results" / "shapes" / "runs" / "cascade"
    cfg = tiny(work)
    cfg["workflow"]["train_nodes"] = 2
    cfg["train"].update(iters=ITERS, log_interval=1, checkpoint_interval=EVERY)
    cfg["self_train"] = dict(cfg.get("self_train") or {}, start_fraction=HALF / ITERS)
    write_config(work, cfg)
    shutil.rmtree(run)  # a new schedule trains from nothing (--resume would continue the old run)
    target = str(run / "model_final.pt")  # the training alone: evaluation is test 1's
    facts: dict = {"run": run}

    out = facts["killed_out"] = work.parent / "two_nodes.out"
    with open(out, "w") as so:
        proc = subprocess.Popen(on_slurm(work, target), env=cluster.env, stdout=so, stderr=subprocess.STDOUT)
        try:
            job_id, killed_at = None, -1
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                if job_id is None:
                    job_id = next((j for j, v in jobs_of(cluster, out).items()
                                   if rule_of(v["comment"]) == "train"), None)
                killed_at = step_of(run / "ckpt_last.pt")
                if job_id and HALF < killed_at < ITERS:
                    cluster.run("scancel", job_id)
                    break
                time.sleep(0.05)
            if not (job_id and HALF < killed_at < ITERS):
                raise AssertionError(
                    f"did not catch the two-node train job between checkpoints (job {job_id}, "
                    f"step {killed_at})\n{tail(out)}{rule_logs(work / 'results')}"
                )
            facts["rc_killed"] = wait_for_failure(proc, out, job_id)
        finally:
            kill_tree(proc)
    facts.update(killed_job=job_id, killed_at=killed_at, final_after_kill=(run / "model_final.pt").exists())

    # The recovery Snakemake prints for a dead run, then the same command.
    facts["unlock"] = subprocess.run(snakemake(work, "--unlock"), capture_output=True, text=True, timeout=300)
    out = facts["resumed_out"] = work.parent / "resumed.out"
    with open(out, "w") as so:
        proc = subprocess.Popen(
            on_slurm(work, "--rerun-incomplete", target), env=cluster.env, stdout=so, stderr=subprocess.STDOUT
        )
        try:
            facts["rc_resumed"] = wait(proc, 400, "the resumed run", out)
        finally:
            kill_tree(proc)
    facts["resumed_jobs"] = jobs_of(cluster, out)
    return facts


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The tiny workflow through SLURM and locally, side by side; when the local one is done,
    the two-node kill-and-resume in its folder while the SLURM run goes on."""
    base = tmp_path_factory.mktemp("slurm")
    work, local = base / "on_slurm", base / "local"
    write_config(work, tiny(work))
    write_config(local, tiny(local))
    t0 = time.monotonic()
    out, local_out = base / "slurm.out", base / "local.out"
    with open(local_out, "w") as lo, open(out, "w") as so:
        loc = subprocess.Popen(snakemake(local, "--cores", "2"), stdout=lo, stderr=subprocess.STDOUT)
        slurm = subprocess.Popen(on_slurm(work), env=cluster.env, stdout=so, stderr=subprocess.STDOUT)
        try:
            rc_local = wait(loc, 600, "the local run", local_out)
            assert rc_local == 0, tail(local_out) + rule_logs(local / "results")
            times = {"local": time.monotonic() - t0}
            keep_reference(local, base / "reference")
            try:
                two_nodes = kill_and_resume(local, cluster)
            except BaseException as err:  # test 3 reports it; tests 1 and 2 still get their run
                if isinstance(err, KeyboardInterrupt):
                    raise
                two_nodes = {"error": f"{type(err).__name__}: {err}"}
            times["two nodes"] = time.monotonic() - t0 - times["local"]
            rc = wait(slurm, 600, "the SLURM run", out)
            times["SLURM run"] = time.monotonic() - t0
        finally:
            kill_tree(loc)
            kill_tree(slurm)
    print("wall times (s):", {k: round(v) for k, v in times.items()})
    assert rc == 0, tail(out) + rule_logs(work / "results") + cluster.logs_tail()
    return {
        "work": work, "reference": base / "reference", "jobs": jobs_of(cluster, out), "run_id": run_id(out),
        "planned": planned_rules(out), "planned_locally": planned_rules(local_out), "two_nodes": two_nodes,
    }


@pytest.mark.slow
@needs_slurm
def test_every_rule_ran_as_a_slurm_job(runs, cluster):
    planned = runs["planned"]
    assert planned == runs["planned_locally"]
    assert {"make_shapes", "pretrain_clip", "train", "evaluate", "report"} <= set(planned)
    jobs = runs["jobs"]
    by_rule = Counter(rule_of(job["comment"]) for job in jobs.values())
    assert by_rule == planned, (by_rule, planned)
    assert all(job["state"] == "COMPLETED" for job in jobs.values()), jobs
    # slurmctld's own record: one line per finished job, all completed, exit code 0
    done = {j: r for j, r in cluster.jobcomp().items() if r["Name"] == runs["run_id"]}
    assert set(done) == set(jobs), (sorted(done), sorted(jobs))
    assert all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in done.values()), done
    assert {r["Partition"] for r in done.values()} == {"cpu", "gpu"}  # the profile's partitions


def _metrics(results: Path, run: str) -> dict:
    return json.loads((results / "shapes" / "eval" / run / "metrics.json").read_text())


@pytest.mark.slow
@needs_slurm
def test_slurm_outputs_match_the_local_run(runs):
    """Measured: the two runs agree exactly (fixed seeds, one thread per job on CPU), so the
    check is equality: weights and confusion counts bit for bit, mIoUs to 1e-9."""
    slurm, local = runs["work"] / "results", runs["reference"] / "results"
    a = torch.load(slurm / "shapes/runs/cascade/model_final.pt", map_location="cpu", weights_only=True)
    b = torch.load(local / "shapes/runs/cascade/model_final.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for run in ("frozen_clip", "cascade"):
        ma, mb = _metrics(slurm, run), _metrics(local, run)
        assert ma["num_images"] == mb["num_images"] == 4
        for key in ("miou", "miou_seen", "miou_unseen", "hiou"):
            assert math.isfinite(ma[key]) and abs(ma[key] - mb[key]) <= 1e-9, (run, key, ma[key], mb[key])
        assert ma["per_class_iou"].keys() == mb["per_class_iou"].keys()
        for name, iou in ma["per_class_iou"].items():
            other = mb["per_class_iou"][name]
            assert (iou is None and other is None) or abs(iou - other) <= 1e-9, (run, name, iou, other)
        ca = np.load(slurm / "shapes" / "eval" / run / "confusion.npy")
        cb = np.load(local / "shapes" / "eval" / run / "confusion.npy")
        assert np.array_equal(ca, cb), run
    assert (slurm / "shapes" / "report" / "summary.csv").read_text() == (
        local / "shapes" / "report" / "summary.csv"
    ).read_text()


@pytest.mark.slow
@needs_slurm
def test_two_node_training_cancelled_by_slurm_resumes(runs, cluster):
    """train_nodes: 2: one torchrun per slurmd (world size 2), scancel between checkpoints,
    then the user's recovery (`--unlock`, rerun with `--rerun-incomplete`)."""
    facts = runs["two_nodes"]
    assert "error" not in facts, facts.get("error")
    run, job_id, killed_at = facts["run"], facts["killed_job"], facts["killed_at"]
    killed_out = facts["killed_out"].read_text(errors="replace")
    assert facts["rc_killed"] != 0 and f"SLURM-job '{job_id}' failed" in killed_out, killed_out[-4000:]
    assert "CANCELLED" in killed_out, killed_out[-4000:]
    assert not facts["final_after_kill"]
    cancelled = cluster.jobs()[job_id]
    assert cancelled["state"] == "CANCELLED" and cancelled["node_count"] == "2", cancelled

    assert facts["unlock"].returncode == 0, facts["unlock"].stderr[-3000:]
    results = run.parents[2]
    assert facts["rc_resumed"] == 0, tail(facts["resumed_out"]) + rule_logs(results) + cluster.logs_tail()
    new = facts["resumed_jobs"]
    assert Counter(rule_of(v["comment"]) for v in new.values()) == Counter(["train"]), new
    (resumed,) = new
    assert new[resumed]["state"] == "COMPLETED" and new[resumed]["node_count"] == "2", new[resumed]
    # srun started the job's torchrun through both slurmds, killed run and resumed run alike
    for node in cluster.nodes:
        log = (cluster.root / "log" / f"slurmd-{node}.log").read_text()
        for job in (job_id, resumed):
            assert f"launch task StepId={job}.0" in log, (node, job)

    assert step_of(run / "ckpt_half.pt") == HALF
    assert step_of(run / "model_final.pt") == ITERS
    last = torch.load(run / "ckpt_last.pt", map_location="cpu", weights_only=True)
    assert len(last["rng"]) == 2  # one generator state per rank: two processes trained
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, ITERS + 1))  # every step once, from before and after the kill
    resumes = [r for r in records if r.get("event") == "resume"]
    assert len(resumes) == 1 and HALF < resumes[0]["step"] <= killed_at, resumes
    assert resumes[0]["world_size"] == resumes[0]["saved_world_size"] == 2


# --- the job shape the executor submits, without a cluster -----------------------------

HAS_PLUGIN = importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None


class _Resources(dict):
    """A job's resources as the executor reads them (`.get` and attribute access)."""

    __getattr__ = dict.__getitem__


def _train_job(work: Path, **workflow) -> tuple[SimpleNamespace, str]:
    """The train job of a dry run through the profile: its resources and shell command."""
    cfg = tiny(work)
    cfg["workflow"].update(workflow)
    write_config(work, cfg)
    res = subprocess.run(snakemake(work, "-n", "-p", "--workflow-profile", str(PROFILE)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    block = (res.stdout + res.stderr).split("\nrule train:\n", 1)[1]
    listed = re.search(r"^ +resources: (.*)$", block, flags=re.M).group(1)
    shell = re.search(r"^Shell command: (.*)$", block, flags=re.M).group(1)
    resources = _Resources()
    for item in listed.split(", "):
        key, value = item.split("=", 1)
        resources[key] = int(value) if value.isdigit() else value
    return SimpleNamespace(resources=resources, threads=1, name="train"), shell


def _sbatch(job: SimpleNamespace) -> str:
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    params = dict(run_uuid="r", slurm_logfile="l", comment_str="rule_train", account="", partition=" -p gpu",
                  workdir="w")
    return get_submit_command(job, params) + set_gres_string(job)


@pytest.mark.skipif(not HAS_PLUGIN, reason="needs snakemake-executor-plugin-slurm: pip install -e '.[dev]'")
def test_two_node_gpu_training_job_shape(tmp_path):
    """What the SLURM test cannot run without GPUs: 2 nodes of 4 GPUs each ask --gres=gpu:4
    (per node, never --gpus=4 for the whole job, nor --ntasks-per-gpu), one task per node,
    the profile's CPUs per task; an `mpi` job, so the executor's job step runs the rule
    without its own srun around it; the rule's srun asks the same per node."""
    job, shell = _train_job(tmp_path, train_nodes=2, train_gpus=4)
    assert {k: job.resources[k] for k in ("nodes", "tasks", "gpu", "gres", "mpi", "cpus_per_task")} == dict(
        nodes=2, tasks=2, gpu=0, gres="gpu:4", mpi="srun", cpus_per_task=32
    )
    call = _sbatch(job)
    for flag in ("--nodes=2", "--ntasks=2", "--gres=gpu:4", "--cpus-per-task=32", "-p gpu"):
        assert flag in call.split() or flag in call, (flag, call)
    assert "--gpus" not in call and "--ntasks-per-gpu" not in call, call
    assert shell.startswith(
        "OMP_NUM_THREADS=1 srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1 --cpus-per-task 32"
        " --gres gpu:4 torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d"
    ), shell


@pytest.mark.skipif(not HAS_PLUGIN, reason="needs snakemake-executor-plugin-slurm: pip install -e '.[dev]'")
def test_one_node_gpu_training_job_shape(tmp_path):
    """One node: --gpus=4 for the job, run inside the executor's srun step (no `mpi`), and
    gpu-run hands the job's GPUs to torchrun."""
    job, shell = _train_job(tmp_path, train_gpus=4)
    assert job.resources["gpu"] == 4 and "mpi" not in job.resources and "nodes" not in job.resources
    call = _sbatch(job)
    assert "--gpus=4" in call and "--nodes" not in call and "--gres" not in call, call
    assert "cascade-clip gpu-run --gpus 4 -- torchrun --standalone --nproc-per-node 4" in shell, shell
