# Download the real datasets' archives (resumable, checksummed) and extract them into
# <downloads_dir>/<dataset>/, where `prepare` reads them. The shapes demo and your own data
# (dataset.source) download nothing; voc21 reads voc12's download, pascal_context_459 its own
# labels and pascal_context_59's images; ADE20K-847's archive is the user's copy (sources.local).


rule download:
    output:
        touch(f"{DOWNLOADS}/{{dataset}}/.complete"),
    wildcard_constraints:
        dataset="coco_stuff_164k|voc12|pascal_context_59|pascal_context_459|ade20k_150|ade20k_847",
    params:
        config=CONFIG,
        root=lambda wc, output: str(Path(output[0]).parents[1]),  # DOWNLOADS
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
        "cascade-clip download --config {params.config:q} --dataset {wildcards.dataset:q}"
        " --root {params.root:q} --no-progress > {log:q} 2>&1"
