# Frozen encoder mode: cache the tapped blocks' features of the training views once
# (HDF5), in N shards that run on N GPUs at once, then join and verify them.
# Validation is not cached: evaluation runs the encoder online with sliding windows.

SHARDS = int(WF["cache_shards"])


rule cache_shard:
    input:
        split=f"{RESULTS}/split.json",
        weights=CLIP_WEIGHTS,
    output:
        f"{RESULTS}/cache/train/shard-{{shard}}-of-{SHARDS}.h5",
    params:
        config=CONFIG,
        settings=settings("seed", "clip", "model", "train.augment", "cache", "dataset"),
        shards=SHARDS,
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
        "OMP_NUM_THREADS={threads} cascade-clip gpu-run --gpus {resources.gpu} -- cascade-clip cache-features --config {params.config}"
        " --split train --shard {wildcards.shard}/{params.shards} --out {output} > {log} 2>&1"


rule cache_join:
    input:
        expand(f"{RESULTS}/cache/train/shard-{{shard}}-of-{SHARDS}.h5", shard=range(SHARDS)),
    output:
        f"{RESULTS}/cache/train.h5",
    params:
        config=CONFIG,
    log:
        f"{LOGS}/cache/join.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../environment.yml"
    shell:
        "(cascade-clip cache-join --inputs {input} --out {output}"
        " && cascade-clip cache-verify --config {params.config} --cache {output}) > {log} 2>&1"
