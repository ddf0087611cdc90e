# Train the cascaded decoders inductively on seen classes: the main run and every
# ablation row (config `ablations`), each with its own config overrides.


rule train:
    input:
        unpack(train_inputs),
    # Only the final weights are an output. The run folder's ckpt_last.pt, ckpt_half.pt and
    # log.jsonl are work in progress: were they outputs, Snakemake would delete them as
    # incomplete after a crash, and the resumed run would lose its half-way weights and its
    # log. `--resume` continues from ckpt_last.pt.
    output:
        final=f"{RESULTS}/runs/{{run}}/model_final.pt",
    wildcard_constraints:
        run="|".join(TRAIN_RUNS),
    params:
        config=CONFIG,
        # self_train.start_fraction places the run's ckpt_half.pt, where self-training starts
        settings=settings("seed", "clip", "model", "dataset", "train", "cache", "self_train.start_fraction"),
        overrides=lambda wc: overrides(run_overrides(wc.run)),
        cache=cache_arg,
        launch=launcher,
        out=parent_of("final"),
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{BENCH}/train/{{run}}.tsv"
    # The main run heads the critical path (self-training waits on it): it goes first.
    priority: lambda wc: 10 if RUN_ROW[wc.run] == MAIN_RUN else 0
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
        " --out {params.out:q} --resume > {log:q} 2>&1"
