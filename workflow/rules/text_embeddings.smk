# Class text embeddings from the frozen text tower, computed once per dataset.


rule text_embeddings:
    input:
        split=f"{RESULTS}/split.json",
        weights=CLIP_WEIGHTS,
    output:
        f"{RESULTS}/text/{DATASET}.h5",
    params:
        config=CONFIG,
        settings=settings("clip", "dataset"),
    log:
        f"{LOGS}/text_embeddings.log",
    benchmark:
        f"{BENCH}/text_embeddings.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=0,
    conda:
        "../../environment.yml"
    shell:
        "cascade-clip text-embeddings --config {params.config:q} --out {output:q} > {log:q} 2>&1"


rule text_embeddings_cross:
    input:
        data=lambda wc: dataset_json(wc.dataset),
        weights=CLIP_WEIGHTS,
    output:
        f"{RESULTS}/text/cross/{{dataset}}.h5",
    params:
        config=CONFIG,
        # VOC-21's background prompts are the protocol's (evaluate.voc21_background)
        settings=lambda wc: settings("clip", "dataset", *(["evaluate.voc21_background"] if wc.dataset == "voc21"
                                                            else [])),
        root=lambda wc: DATA_ROOTS[wc.dataset],
    log:
        f"{LOGS}/text_embeddings/{{dataset}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=0,
    conda:
        "../../environment.yml"
    shell:
        "cascade-clip text-embeddings --config {params.config:q} --set dataset.name={wildcards.dataset:q}"
        " --set dataset.root={params.root:q} --set 'dataset.unseen=[]' --out {output:q} > {log:q} 2>&1"
