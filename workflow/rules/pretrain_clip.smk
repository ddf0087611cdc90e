# Demo only: pre-train the shapes world's small CLIP contrastively on whole images and
# image-level captions (never on masks). Real runs load OpenAI's ViT-B/16 instead.

if IS_SHAPES:

    rule pretrain_clip:
        input:
            f"{DATA_ROOT}/dataset.json",
        output:
            weights=config["clip"]["pretrained"],
            model_config=config["clip"]["model_config"],
        params:
            config=CONFIG,
            settings=settings("seed", "pretrain", "shapes", "dataset"),
            out=parent_of("weights"),
        log:
            f"{LOGS}/pretrain_clip.log",
        benchmark:
            f"{BENCH}/pretrain_clip.tsv"
        threads: 1024  # all of --cores (Snakemake caps it): nothing else can run meanwhile
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../../environment.yml"
        shell:
            "OMP_NUM_THREADS={threads:q} cascade-clip pretrain-clip --config {params.config:q}"
            " --out {params.out:q} > {log:q} 2>&1"
