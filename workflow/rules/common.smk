# Shared paths and helpers. The rules only call the `cascade-clip` CLI.

import hashlib
import json
from pathlib import Path

import yaml

from cascade_clip.config import shared_cache_stages
from cascade_clip.paper import row_overrides

EXP = config["experiment"]
RESULTS = Path(config["results_dir"]) / EXP
LOGS = RESULTS / "logs"
BENCH = RESULTS / "benchmarks"
WF = config["workflow"]
DATASET = config["dataset"]["name"]
DATA_ROOT = config["dataset"]["root"]
DOWNLOADS = WF["downloads_dir"]
IS_SHAPES = DATASET == "shapes"
ABLATIONS = config["ablations"]  # row name -> {dotted.key: value, and `paper`: its paper ids}
MAIN_RUN = WF["main_run"]
SELF_TRAIN_RUN = f"{MAIN_RUN}_st"
# workflow.seeds: every row (and self-training) trains once per training seed (train.seed)
# over the same world, CLIP and cache. The first seed's run keeps the row's name, the others
# are <row>_seed<n>; the report shows mean +- std per row. Unset: one run per row.
SEEDS = WF.get("seeds") or [None]
SEED_SUFFIXES = [""] + [f"_seed{seed}" for seed in SEEDS[1:]]
RUN_ROW = {row + sfx: row for row in ABLATIONS for sfx in SEED_SUFFIXES}
RUN_SEED = {row + sfx: seed for row in ABLATIONS for sfx, seed in zip(SEED_SUFFIXES, SEEDS)}
TRAIN_RUNS = list(RUN_ROW)
# self-training run -> the main run (same seed) it starts from
ST_MAIN = {SELF_TRAIN_RUN + sfx: MAIN_RUN + sfx for sfx in SEED_SUFFIXES} if WF["self_train"] else {}
RUNS = TRAIN_RUNS + list(ST_MAIN)

if MAIN_RUN not in ABLATIONS:
    raise ValueError(f"workflow.main_run {MAIN_RUN!r} is not one of the ablations {list(ABLATIONS)}")

# The effective, schema-validated config that every stage reads. Written only when it
# changes, so its timestamp stays put across invocations.
RESOLVED_CONFIG = RESULTS / "config.yaml"
_resolved = yaml.safe_dump(dict(config), sort_keys=False)
if not RESOLVED_CONFIG.exists() or RESOLVED_CONFIG.read_text() != _resolved:
    RESOLVED_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    RESOLVED_CONFIG.write_text(_resolved)
CONFIG = str(RESOLVED_CONFIG)


def settings(*keys):
    """A digest of the config values a rule's command reads ("train", "train.augment", ...).

    Every rule reads the one resolved config file, whose path never changes, so Snakemake
    would not see an edit to config.yaml; a `settings` param changes with those values and
    Snakemake's params rerun trigger reruns exactly the rules that read them."""
    chosen = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        chosen[key] = node
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]


def overrides(mapping):
    """{"model.stages": [[12]]} -> ["--set", "model.stages=[[12]]"]: CLI arguments.

    A list: rules write it as `{params.overrides:q}`, which shell-quotes every item."""
    args = []
    for key, value in (mapping or {}).items():
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
        args += ["--set", f"{key}={text}"]
    return args


def run_overrides(run):
    """The config overrides that define a run: its ablation row's, its training seed, and
    for self-training those of the main run it starts from plus the transductive setting."""
    if run in ST_MAIN:
        return dict(run_overrides(ST_MAIN[run]), **{"train.setting": "transductive"})
    ov = row_overrides(ABLATIONS[RUN_ROW[run]])
    if RUN_SEED[run] is not None:
        ov["train.seed"] = RUN_SEED[run]
    return ov


def run_value(run, dotted):
    """A config value as a run sees it (its overrides first, then the config)."""
    ov = run_overrides(run)
    if dotted in ov:
        return ov[dotted]
    node = config
    for key in dotted.split("."):
        node = node[key]
    return node


def run_uses_cache(run):
    """Frozen runs train from the feature cache, unless cache.enabled is false (online)."""
    return run_value(run, "model.encoder_mode") == "frozen" and bool(run_value(run, "cache.enabled"))


def nproc(gpus):
    """Processes of a job: one per GPU, or one CPU process (gloo) without GPUs."""
    return max(1, int(gpus))


def cli_on_one_node(gpus):
    """How a one-node job runs `cascade_clip.cli`: one process per GPU under `torchrun
    --standalone`; a single process (one GPU, or the CPU) runs the console script itself.
    torchrun's launcher costs a single-process job ~2.5 s of CPU (its own `import torch`
    and a rendezvous) for nothing: without its variables the CLI is a world of one.

    Shell text that rules insert unquoted: it holds only an integer and fixed words."""
    n = nproc(gpus)
    return "cascade-clip" if n == 1 else f"torchrun --standalone --nproc-per-node {n} -m cascade_clip.cli"


CLIP_WEIGHTS = [config["clip"]["pretrained"]] if IS_SHAPES else []


# Data roots of every dataset the workflow needs: the main one and cross-evaluation targets
# (`cross_eval`, and the open-vocabulary suite with workflow.open_vocab).
from cascade_clip.data.registry import cross_eval_targets  # noqa: E402

CROSS_TARGETS = cross_eval_targets(config)
DATA_ROOTS = {DATASET: DATA_ROOT}
DATA_ROOTS.update(CROSS_TARGETS)


def dataset_json(name):
    return f"{DATA_ROOTS[name]}/dataset.json"


def train_inputs(wildcards):
    inputs = {"split": f"{RESULTS}/split.json", "text": f"{RESULTS}/text/{DATASET}.h5"}
    if run_uses_cache(wildcards.run):
        inputs["cache"] = f"{RESULTS}/cache/train.h5"
    inputs["weights"] = CLIP_WEIGHTS
    return inputs


def cache_arg(wildcards, input):
    """["--cache", FILE] when the run trains from the feature cache (write it `:q`)."""
    return ["--cache", input.cache] if "cache" in input.keys() else []


def parent_of(name):
    """A params function: the folder of output `name` (run and eval folders)."""
    return lambda wildcards, output: str(Path(output[name]).parent)


TRAIN_NODES = int(WF["train_nodes"])


def train_resources():
    """The GPU and node requests of a training job (train, self_train), as resources.

    One node: `gpu` GPUs (Snakemake counts them locally; the SLURM executor asks `--gpus`).
    Several nodes (workflow.train_nodes > 1, SLURM only): the job's own srun starts one task
    per node (see `launcher`), so the executor must submit it as an `mpi` job, whose script
    runs the rule directly. Any other job runs inside a one-task srun step of the executor's,
    and an srun started in there inherits that step's one task on one node ("can't run 1
    processes on 2 nodes"): one torchrun would wait for a second node that never comes
    (tests/test_slurm.py saw it on SLURM 22.05). GPUs are asked per node (gres gpu:N, one
    torchrun process each); `--gpus` would count them over the whole job, so `gpu` is 0 there.
    """
    gpus = int(WF["train_gpus"])
    if TRAIN_NODES == 1:
        return {"gpu": gpus}
    shape = {"gpu": 0, "nodes": TRAIN_NODES, "tasks": TRAIN_NODES, "tasks_per_gpu": 0, "mpi": "srun"}
    if gpus:
        shape["gres"] = f"gpu:{gpus}"
    return shape


def launcher(wildcards, resources):
    """How a training job starts its processes.

    One node: `torchrun --standalone`, one process per GPU that gpu-run locked for the job
    (one GPU or none: the console script, `cli_on_one_node`).
    Several nodes (workflow.train_nodes > 1, under SLURM): srun starts one torchrun per node
    of the job's allocation (with the job's CPUs per task and GPUs per node); they meet at
    this host, the node that runs the job's script and the rule (c10d rendezvous on a port
    derived from the job id, so two jobs sharing a node do not collide). The executor runs
    the rule with most SLURM_* variables removed, so nothing here reads the node list;
    srun finds the allocation by SLURM_JOB_ID.

    Shell text that rules insert unquoted (`{params.launch}`): it holds only integers and
    fixed words, never a config string.
    """
    if TRAIN_NODES == 1:
        return (
            f"cascade-clip gpu-run --gpus {resources.gpu} -- {cli_on_one_node(resources.gpu)}"
        )
    gpus = int(WF["train_gpus"])
    step = f"srun --nodes {TRAIN_NODES} --ntasks-per-node 1 --kill-on-bad-exit=1"
    cpus = resources.get("cpus_per_task")
    if isinstance(cpus, int) and cpus > 0:
        step += f" --cpus-per-task {cpus}"
    if gpus:
        step += f" --gres gpu:{gpus}"
    return (
        f"{step} torchrun --nnodes {TRAIN_NODES} --nproc-per-node {nproc(gpus)}"
        " --rdzv-backend c10d --rdzv-id $SLURM_JOB_ID"
        " --rdzv-endpoint $(hostname):$((29500 + SLURM_JOB_ID % 1000)) -m cascade_clip.cli"
    )
