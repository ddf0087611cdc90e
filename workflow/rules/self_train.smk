# Transductive self-training: start from the main run's checkpoint at half its schedule;
# unseen regions get online pseudo-labels (argmax over unseen classes), all classes query.


rule self_train:
    input:
        # The main run's ckpt_half.pt is written before its model_final.pt; it is no output
        # of that rule (see train.smk), so the final weights stand for the finished run.
        main=lambda wc: f"{RESULTS}/runs/{ST_MAIN[wc.strun]}/model_final.pt",
        text=f"{RESULTS}/text/{DATASET}.h5",
        cache=f"{RESULTS}/cache/train.h5" if run_uses_cache(MAIN_RUN) else [],
        weights=CLIP_WEIGHTS,
    output:
        final=f"{RESULTS}/runs/{{strun}}/model_final.pt",
    wildcard_constraints:
        strun="|".join(ST_MAIN) or "no self-training run",
    params:
        init=lambda wc: f"{RESULTS}/runs/{ST_MAIN[wc.strun]}/ckpt_half.pt",
        config=CONFIG,
        settings=settings("seed", "clip", "model", "dataset", "train", "self_train", "cache"),
        overrides=lambda wc: overrides(run_overrides(wc.strun)),
        cache=lambda wc, input: ["--cache", input.cache] if input.cache else [],
        launch=launcher,
        out=parent_of("final"),
    log:
        f"{LOGS}/train/{{strun}}.log",
    benchmark:
        f"{BENCH}/train/{{strun}}.tsv"
    priority: 10  # on the critical path: ahead of evaluations that are ready at the same time
    threads: WF["threads"]
    resources:
        mem_mb=WF["train_mem_mb"],
        runtime=WF["train_runtime_min"],
        **train_resources(),  # gpu; with workflow.train_nodes > 1 the SLURM multi-node shape
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads:q} {params.launch} train"
        " --config {params.config:q} {params.overrides:q} --text {input.text:q} {params.cache:q}"
        " --init {params.init:q} --out {params.out:q} --resume > {log:q} 2>&1"
