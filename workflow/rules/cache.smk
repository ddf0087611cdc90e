# Frozen encoder mode: cache the tapped blocks' features of the training views once
# (HDF5), in N shards that run on N GPUs at once, then join and verify them.
# Validation is not cached: evaluation runs the encoder online with sliding windows.

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


rule cache_shard:
    input:
        split=f"{RESULTS}/split.json",
        weights=CLIP_WEIGHTS,
    output:
        f"{RESULTS}/cache/train/shard-{{shard}}-of-{SHARDS}.h5",
    params:
        config=CONFIG,
        settings=settings("seed", "clip", "model", "train.augment", "cache", "dataset"),
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
        runtime=12 * 60,
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads:q} cascade-clip gpu-run --gpus {resources.gpu:q} --"
        " cascade-clip cache-features --config {params.config:q} {params.overrides:q} --split train"
        " --shard {params.shard:q} --out {output:q} > {log:q} 2>&1"


rule cache_join:
    input:
        expand(f"{RESULTS}/cache/train/shard-{{shard}}-of-{SHARDS}.h5", shard=range(SHARDS)),
    output:
        f"{RESULTS}/cache/train.h5",
    params:
        config=CONFIG,
        overrides=overrides(CACHE_OVERRIDES),
    log:
        f"{LOGS}/cache/join.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../environment.yml"
    shell:
        "(cascade-clip cache-join --inputs {input:q} --out {output:q}"
        " && cascade-clip cache-verify --config {params.config:q} {params.overrides:q} --cache {output:q})"
        " > {log:q} 2>&1"
