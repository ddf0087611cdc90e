# Evaluate every run on the validation split (sliding window, mIoU seen/unseen, hIoU),
# frozen CLIP's own dense similarity with no decoder, and cross-dataset transfer.


rule evaluate:
    input:
        ckpt=f"{RESULTS}/runs/{{run}}/model_final.pt",
        text=f"{RESULTS}/text/{DATASET}.h5",
        weights=CLIP_WEIGHTS,
    output:
        metrics=f"{RESULTS}/eval/{{run}}/metrics.json",
        per_class=f"{RESULTS}/eval/{{run}}/per_class.csv",
        confusion=f"{RESULTS}/eval/{{run}}/confusion.npy",
        examples=directory(f"{RESULTS}/eval/{{run}}/examples"),
    params:
        config=CONFIG,
        settings=settings("clip", "model", "dataset", "evaluate", "train.amp"),
        overrides=lambda wc: overrides(run_overrides(wc.run)),
        launch=lambda wc, resources: cli_on_one_node(resources.gpu),
        out=parent_of("metrics"),
    log:
        f"{LOGS}/evaluate/{{run}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{run}}.tsv"
    threads: WF["threads"]
    resources:
        gpu=WF["eval_gpus"],
        mem_mb=8000,
        runtime=120,
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads:q} cascade-clip gpu-run --gpus {resources.gpu:q} --"
        " {params.launch} evaluate"
        " --config {params.config:q} {params.overrides:q} --checkpoint {input.ckpt:q}"
        " --text {input.text:q} --out {params.out:q} > {log:q} 2>&1"


rule evaluate_frozen_clip:
    input:
        text=f"{RESULTS}/text/{DATASET}.h5",
        data=dataset_json(DATASET),
        weights=CLIP_WEIGHTS,
    output:
        metrics=f"{RESULTS}/eval/frozen_clip/metrics.json",
        per_class=f"{RESULTS}/eval/frozen_clip/per_class.csv",
        confusion=f"{RESULTS}/eval/frozen_clip/confusion.npy",
        examples=directory(f"{RESULTS}/eval/frozen_clip/examples"),
    params:
        config=CONFIG,
        settings=settings("clip", "model", "dataset", "evaluate", "train.amp"),
        out=parent_of("metrics"),
    log:
        f"{LOGS}/evaluate/frozen_clip.log",
    benchmark:
        f"{BENCH}/evaluate/frozen_clip.tsv"
    threads: WF["threads"]
    resources:
        gpu=min(1, WF["eval_gpus"]),
        mem_mb=8000,
        runtime=120,
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads:q} cascade-clip gpu-run --gpus {resources.gpu:q} --"
        " cascade-clip evaluate --config {params.config:q} --baseline dense --text {input.text:q}"
        " --out {params.out:q} > {log:q} 2>&1"


rule evaluate_cross:
    input:
        ckpt=f"{RESULTS}/runs/{MAIN_RUN}/model_final.pt",
        text=f"{RESULTS}/text/cross/{{dataset}}.h5",
        data=lambda wc: dataset_json(wc.dataset),
        weights=CLIP_WEIGHTS,
    output:
        metrics=f"{RESULTS}/eval/cross/{{dataset}}/metrics.json",
    params:
        config=CONFIG,
        settings=settings("clip", "model", "dataset", "evaluate", "train.amp"),
        overrides=overrides(run_overrides(MAIN_RUN)),
        root=lambda wc: DATA_ROOTS[wc.dataset],
        launch=lambda wc, resources: cli_on_one_node(resources.gpu),
        out=parent_of("metrics"),
    log:
        f"{LOGS}/evaluate/cross_{{dataset}}.log",
    benchmark:
        f"{BENCH}/evaluate/cross_{{dataset}}.tsv"
    threads: WF["threads"]
    resources:
        gpu=WF["eval_gpus"],
        mem_mb=8000,
        runtime=120,
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads:q} cascade-clip gpu-run --gpus {resources.gpu:q} --"
        " {params.launch} evaluate"
        " --config {params.config:q} {params.overrides:q} --checkpoint {input.ckpt:q}"
        " --text {input.text:q} --dataset-root {params.root:q} --dataset {wildcards.dataset:q}"
        " --out {params.out:q} > {log:q} 2>&1"
