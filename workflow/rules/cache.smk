# Frozen encoder mode: cache the tapped blocks' features of the training views once
# (HDF5), in N shards that run on N GPUs at once, then join them.
# Validation is not cached: evaluation runs the encoder online with sliding windows.
# Runs with cache.enabled: false train online instead; with no run reading the cache these
# rules do not run.

from cascade_clip.plan.sizes import cache_job_minutes

SHARDS = int(WF["cache_shards"])
# The cache holds the config's model in frozen mode, also when the main run trains prompts
# (vpt) and only an ablation row (`frozen`) reads the cache: the stages write and verify it
# with these overrides. One cache serves every run that trains from it: it holds every block
# those runs tap (shared_cache_stages), so a row may tap blocks outside the config's stages.
CACHE_OVERRIDES = {} if config["model"]["encoder_mode"] == "frozen" else {"model.encoder_mode": "frozen"}
CACHE_STAGES = shared_cache_stages(
    config["model"]["stages"], [run_value(run, "model.stages") for run in RUNS if run_uses_cache(run)]
)
if CACHE_STAGES != config["model"]["stages"]:
    CACHE_OVERRIDES["model.stages"] = CACHE_STAGES
# Time limits that follow the rows a job handles (SLURM's runtime; cascade_clip.plan.sizes).
SHARD_MINUTES, JOIN_MINUTES = cache_job_minutes(WORKFLOW_CONFIG, SHARDS, int(WF["cache_gpus"]))
# Rows whose values the join checks: each shard's own job read back and checked every row.
JOIN_SAMPLE = 64


# `cache-features` writes <shard>.partial, reads every row back and checks it, and only then
# renames it onto the shard: the shard is this job's only output, and a job killed while
# writing or verifying leaves the partial (no output, so Snakemake deletes nothing) for the
# rerun to resume (nothing to encode when all rows were written: it verifies again).
rule cache_shard:
    input:
        split=f"{RESULTS}/split.json",
        weights=CLIP_WEIGHTS,
    output:
        f"{RESULTS}/cache/train/shard-{{shard}}-of-{SHARDS}.h5",
    params:
        config=CONFIG,
        # what the cached features depend on (not cache.enabled or cache.batch_size: a row
        # that stops reading the cache must not rewrite it for the rows that still do)
        settings=settings("seed", "clip", "model", "train.augment", "cache.views_per_image",
                          "cache.compression", "cache.encoding", "dataset"),
        overrides=overrides(CACHE_OVERRIDES),
        shard=lambda wc: f"{wc.shard}/{SHARDS}",
    log:
        f"{LOGS}/cache/shard-{{shard}}.log",
    benchmark:
        f"{BENCH}/cache/shard-{{shard}}.tsv"
    threads: WF["cache_threads"] or max(1, WF["threads"] // SHARDS)
    resources:
        gpu=WF["cache_gpus"],
        mem_mb=8000,
        runtime=SHARD_MINUTES,
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads:q} cascade-clip gpu-run --gpus {resources.gpu:q} --"
        " cascade-clip cache-features --config {params.config:q} {params.overrides:q} --split train"
        " --shard {params.shard:q} --out {output:q} > {log:q} 2>&1"


# The join writes a small index over the verified shards, then checks what it joined against
# the config (provenance, row counts, image ids, each shard's layout and verification) and
# the values of JOIN_SAMPLE rows: no full re-read. Its only output is the index; killed, it
# costs the index, never a shard.
rule cache_join:
    input:
        expand(f"{RESULTS}/cache/train/shard-{{shard}}-of-{SHARDS}.h5", shard=range(SHARDS)),
    output:
        f"{RESULTS}/cache/train.h5",
    params:
        config=CONFIG,
        overrides=overrides(CACHE_OVERRIDES),
        sample=JOIN_SAMPLE,
    log:
        f"{LOGS}/cache/join.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=JOIN_MINUTES,
    conda:
        "../../environment.yml"
    shell:
        "(cascade-clip cache-join --inputs {input:q} --out {output:q}"
        " && cascade-clip cache-verify --config {params.config:q} {params.overrides:q} --cache {output:q}"
        " --sample {params.sample:q}) > {log:q} 2>&1"
