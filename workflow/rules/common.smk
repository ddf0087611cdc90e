# Shared paths and helpers. The rules only call the `cascade-clip` CLI.

import hashlib
import json
from pathlib import Path

import yaml

EXP = config["experiment"]
RESULTS = Path(config["results_dir"]) / EXP
LOGS = RESULTS / "logs"
BENCH = RESULTS / "benchmarks"
WF = config["workflow"]
DATASET = config["dataset"]["name"]
DATA_ROOT = config["dataset"]["root"]
DOWNLOADS = WF["downloads_dir"]
IS_SHAPES = DATASET == "shapes"
ABLATIONS = config["ablations"]  # run name -> {dotted.key: value}
MAIN_RUN = WF["main_run"]
SELF_TRAIN_RUN = f"{MAIN_RUN}_st"
RUNS = list(ABLATIONS) + ([SELF_TRAIN_RUN] if WF["self_train"] else [])

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
    """The config overrides that define a run (ablation row, or the self-training run)."""
    if run == SELF_TRAIN_RUN:
        return dict(ABLATIONS[MAIN_RUN], **{"train.setting": "transductive"})
    return ABLATIONS[run]


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
    return run_value(run, "model.encoder_mode") == "frozen"


def nproc(gpus):
    """torchrun processes: one per GPU, or one CPU process (gloo) without GPUs."""
    return max(1, int(gpus))


CLIP_WEIGHTS = [config["clip"]["pretrained"]] if IS_SHAPES else []


# Data roots of every dataset the workflow needs: the main one and cross-evaluation targets.
DATA_ROOTS = {DATASET: DATA_ROOT}
DATA_ROOTS.update({c["dataset"]: c["root"] for c in config["cross_eval"]})


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


def launcher(wildcards, resources):
    """How a training/evaluation job starts its processes.

    One node: `torchrun --standalone`, one process per GPU that gpu-run locked for the job.
    Several nodes (workflow.train_nodes > 1, under SLURM): srun starts one torchrun per node
    and they meet at the first node of the allocation (c10d rendezvous).

    Shell text that rules insert unquoted (`{params.launch}`): it holds only integers and
    fixed words, never a config string.
    """
    per_node = nproc(resources.gpu)
    nodes = int(WF["train_nodes"])
    if nodes == 1:
        return (
            f"cascade-clip gpu-run --gpus {resources.gpu} --"
            f" torchrun --standalone --nproc-per-node {per_node}"
        )
    return (
        f"srun --nodes {nodes} --ntasks-per-node 1 torchrun --nnodes {nodes} --nproc-per-node {per_node}"
        " --rdzv-backend c10d --rdzv-id $SLURM_JOB_ID"
        " --rdzv-endpoint $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1):29500"
    )
