# Download the real datasets' archives (resumable, checksummed) and extract them.
# The shapes demo downloads nothing.


rule download:
    output:
        touch(f"{DOWNLOADS}/{{dataset}}/.complete"),
    wildcard_constraints:
        dataset="coco_stuff_164k|voc12|pascal_context_59",
    params:
        root=lambda wc: f"{DOWNLOADS}/{wc.dataset}",
    log:
        f"{LOGS}/download/{{dataset}}.log",
    benchmark:
        f"{BENCH}/download/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=24 * 60,
    conda:
        "../../environment.yml"
    shell:
        "cascade-clip download --dataset {wildcards.dataset} --root {params.root}"
        " > {log} 2>&1"
