# Collect metrics, curves, examples and stage run times for `snakemake --report`.

CROSS = list(CROSS_TARGETS)
REPORT = RESULTS / "report"


rule report:
    input:
        metrics=expand(f"{RESULTS}/eval/{{run}}/metrics.json", run=["frozen_clip"] + RUNS),
        cross=expand(f"{RESULTS}/eval/cross/{{dataset}}/metrics.json", dataset=CROSS),
        runs=expand(f"{RESULTS}/runs/{{run}}/model_final.pt", run=RUNS),  # and their log.jsonl
        examples=f"{RESULTS}/eval/{SELF_TRAIN_RUN if WF['self_train'] else MAIN_RUN}/examples",
    output:
        summary=report(
            REPORT / "summary.html",
            caption="../report/summary.rst",
            category="1. Results",
            labels={"table": "mIoU seen / unseen / hIoU"},
        ),
        paper=report(
            REPORT / "paper.html",
            caption="../report/paper.rst",
            category="1. Results",
            labels={"table": "the paper beside ours"},
        ),
        per_class=report(
            REPORT / "per_class.html",
            caption="../report/per_class.rst",
            category="1. Results",
            labels={"table": "per-class IoU"},
        ),
        curves=report(
            REPORT / "curves.png",
            caption="../report/curves.rst",
            category="2. Training",
            labels={"figure": "training curves"},
        ),
        examples=report(
            directory(REPORT / "examples"),
            patterns=["{name}.png"],
            caption="../report/examples.rst",
            category="3. Examples",
            labels={"image": "{name}"},
        ),
        open_vocab=report(
            REPORT / "open_vocab.html",
            caption="../report/open_vocab.rst",
            category="1. Results",
            labels={"table": "other datasets, both rules for absent classes"},
        ),
        runtimes=report(
            REPORT / "runtimes.html",
            caption="../report/runtimes.rst",
            category="4. Run times",
            labels={"table": "stage run times"},
        ),
        summary_csv=REPORT / "summary.csv",
        paper_csv=REPORT / "paper.csv",
    params:
        config=CONFIG,
        results=lambda wc, input: str(Path(input.metrics[0]).parents[2]),
        report=parent_of("summary"),
        runs=["frozen_clip"] + RUNS,
        main=MAIN_RUN,
        cross=CROSS,
    log:
        f"{LOGS}/report.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../environment.yml"
    shell:
        "cascade-clip report --config {params.config:q} --results {params.results:q}"
        " --runs {params.runs:q} --cross {params.cross:q} --examples {input.examples:q}"
        " --out {params.report:q} > {log:q} 2>&1"
