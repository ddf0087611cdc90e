"""A throwaway SLURM cluster on this machine, owned by the test that starts it.

`SlurmCluster(root).start()` writes a munge key and a `slurm.conf` under `root`, then starts
`munged`, `slurmctld` and one `slurmd` per node as child processes in the foreground (`-D`),
each with its own state, spool, pid and log files under `root` and TCP ports picked free on
loopback. Every node is this machine (NodeAddr 127.0.0.1, a distinct slurmd port per node,
`slurmd -N NAME`), so two "nodes" give a real two-node allocation: `srun --nodes 2` starts one
task through each slurmd, as on a cluster.

What a container allows: no cgroups (proctrack/linuxproc, task/none), no accounting daemon
(accounting_storage/none, so `sacct` does not work: job status comes from `squeue`, kept for
an hour by MinJobAge), and `jobcomp/filetxt`, which writes one line per finished job to
`root/jobcomp.txt` (`jobcomp()` reads them back). The nodes declare more CPUs and memory than
the machine has (SlurmdParameters=config_overrides), so a profile's real requests (32 CPUs,
64 GB) are scheduled; no GPUs are declared.

`stop()` cancels every job, stops the daemons, kills any process that still carries this
cluster's marker in its environment (job steps, slurmstepd) and returns what it had to kill.
All SLURM commands must run with `cluster.env`: SLURM_CONF points at this cluster, and its
PATH starts with `root/bin`, wrappers of the client commands that set SLURM_CONF again (the
executor's job step removes it; on a real cluster slurm.conf sits at the default path).
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")
MARKER = "CASCADE_CLIP_TEST_SLURM"  # environment variable naming the cluster's root folder


def missing_binaries() -> list[str]:
    """The SLURM and munge programs this machine lacks (empty when a cluster can start)."""
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on loopback right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SlurmCluster:
    """One partition per name in `partitions`, all over the same `nodes` (this machine)."""

    def __init__(
        self,
        root: Path | None = None,
        nodes: tuple[str, ...] = ("n1", "n2"),
        partitions: tuple[str, ...] = ("cpu", "gpu"),
        cpus: int = 64,
        memory_mb: int = 256_000,
    ) -> None:
        # munged wants every folder above its socket searchable by all, which a pytest
        # tmp_path (under a 0700 folder) is not: by default the cluster lives in /tmp.
        self.root = Path(root or tempfile.mkdtemp(prefix="cascade-slurm-")).resolve()
        self.root.chmod(0o755)
        self.nodes = nodes
        self.partitions = partitions
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.conf = self.root / "slurm.conf"
        self.jobcomp_file = self.root / "jobcomp.txt"
        self.procs: dict[str, subprocess.Popen] = {}
        # SLURM's commands find slurm.conf at their compiled-in path on a real cluster, and the
        # executor's job step drops every SLURM_* variable, SLURM_CONF too, before it calls
        # srun. Here the conf lives in `root`, so bin/ holds wrappers that name it.
        self.bin = self.root / "bin"
        path = f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = dict(os.environ, PATH=path, SLURM_CONF=str(self.conf), **{MARKER: str(self.root)})
        # A job inherits the submitter's environment (--export=ALL): never a SLURM job's own.
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if key != "SLURM_CONF":
                del self.env[key]

    # --- configuration ------------------------------------------------------------------

    def write_config(self) -> None:
        for sub in ("state", "log", "munge", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self.bin.mkdir(mode=0o755, exist_ok=True)
        for name in CLIENTS:
            wrapper = self.bin / name
            real = shlex.quote(shutil.which(name) or name)
            wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={shlex.quote(str(self.conf))} exec {real} "$@"\n')
            wrapper.chmod(0o755)
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        r = self.root
        lines = [
            "ClusterName=cascadetest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={node_ports[0]}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.socket",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp_file}",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=3600",  # finished jobs stay in squeue: the executor's status source
            "KillWait=5",
            "SlurmdTimeout=60",
            "SlurmdParameters=config_overrides",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN"
            )
        nodes = ",".join(self.nodes)
        for i, part in enumerate(self.partitions):
            default = "YES" if i == 0 else "NO"
            lines.append(f"PartitionName={part} Nodes={nodes} Default={default} MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    # --- daemons ------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n"
                                       + self.logs_tail())
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}:\n" + self.logs_tail())

    def start(self, timeout: float = 60) -> SlurmCluster:
        self.write_config()
        m = self.root / "munge"
        self._spawn("munged", [
            "munged", "--foreground", f"--socket={m}/munge.socket", f"--key-file={m}/munge.key",
            f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed",
            "--num-threads=4",
        ])
        self._wait("munged's socket", (m / "munge.socket").exists, timeout)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout)
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait("every node idle", self._all_idle, timeout)
        return self

    def _all_idle(self) -> bool:
        res = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
        return set(states) == set(self.nodes) and all(s == "idle" for s in states.values())

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr}")
        return res

    # --- what the cluster did -----------------------------------------------------------

    def jobs(self) -> dict[str, dict[str, str]]:
        """Every job slurmctld still holds (MinJobAge keeps finished ones for an hour):
        job id -> {state, name, comment, nodes, node_count}."""
        fmt = "JobID:|,State:|,Name:|,Comment:|,NodeList:|,NumNodes:|"
        res = self.run("squeue", "-h", "--states=all", "-O", fmt)
        out = {}
        for line in res.stdout.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) >= 6 and parts[0]:
                job_id, state, name, comment, nodes, count = parts[:6]
                out[job_id] = dict(state=state, name=name, comment=comment, nodes=nodes, node_count=count)
        return out

    def jobcomp(self) -> dict[str, dict[str, str]]:
        """The jobcomp/filetxt records: job id -> {JobState, NodeCnt, NodeList, ExitCode, ...}."""
        if not self.jobcomp_file.exists():
            return {}
        out = {}
        for line in self.jobcomp_file.read_text().splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if "JobId" in fields:
                out[fields["JobId"]] = fields
        return out

    def logs_tail(self, chars: int = 1500) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # --- shutting down ------------------------------------------------------------------

    def marked_processes(self) -> list[psutil.Process]:
        """Processes (other than this one) whose environment names this cluster: the
        daemons, slurmstepd and every job process they started."""
        found = []
        for proc in psutil.process_iter():
            if proc.pid == os.getpid():
                continue
            try:
                if proc.environ().get(MARKER) == str(self.root):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                continue
        return found

    def daemon_processes(self) -> list[psutil.Process]:
        """slurmctld/slurmd/munged processes reading this cluster's files (by command line)."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if str(self.root) in cmdline and any(d in cmdline for d in DAEMONS):
                found.append(proc)
        return found

    def stop(self, exclude: tuple[int, ...] = ()) -> list[str]:
        """Cancel every job, stop the daemons, and kill what is left of this cluster.

        `exclude`: pids not to touch (the caller's own children, which it ends itself).
        Returns a description of each process that had to be killed after the daemons
        stopped (empty when everything ended in order)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                live = self.run("squeue", "-h", "-t", "PD,R,CG,S,CF", "-o", "%i", check=False).stdout.split()
                if live:
                    self.run("scancel", *live, check=False)
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-t", "PD,R,CG,S,CF", "-o", "%i", check=False
                    ).stdout.split():
                        time.sleep(0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        # slurmds first (they end their steps), then the controller, then munge.
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            children = []
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            for child in children:  # slurmctld's slurmscriptd
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
        leftovers = [p for p in self.marked_processes() if p.pid not in exclude]
        killed = []
        for proc in leftovers:
            try:
                killed.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)
        return killed
