# Transductive self-training: start from the main run's checkpoint at half its schedule;
# unseen regions get online pseudo-labels (argmax over unseen classes), all classes query.


rule self_train:
    input:
        init=f"{RESULTS}/runs/{MAIN_RUN}/ckpt_half.pt",
        text=f"{RESULTS}/text/{DATASET}.h5",
        cache=f"{RESULTS}/cache/train.h5" if run_uses_cache(MAIN_RUN) else [],
        weights=CLIP_WEIGHTS,
    output:
        final=f"{RESULTS}/runs/{SELF_TRAIN_RUN}/model_final.pt",
        log=f"{RESULTS}/runs/{SELF_TRAIN_RUN}/log.jsonl",
    params:
        config=CONFIG,
        settings=settings("seed", "clip", "model", "dataset", "train", "self_train", "cache"),
        overrides=overrides(run_overrides(SELF_TRAIN_RUN)),
        cache=lambda wc, input: ["--cache", input.cache] if input.cache else [],
        launch=launcher,
        out=parent_of("final"),
    log:
        f"{LOGS}/train/{SELF_TRAIN_RUN}.log",
    benchmark:
        f"{BENCH}/train/{SELF_TRAIN_RUN}.tsv"
    priority: 10  # on the critical path: ahead of evaluations that are ready at the same time
    threads: WF["threads"]
    resources:
        gpu=WF["train_gpus"],
        mem_mb=WF["train_mem_mb"],
        runtime=WF["train_runtime_min"],
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads:q} {params.launch} -m cascade_clip.cli train"
        " --config {params.config:q} {params.overrides:q} --text {input.text:q} {params.cache:q}"
        " --init {input.init:q} --out {params.out:q} --resume > {log:q} 2>&1"
