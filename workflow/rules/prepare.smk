# Convert downloads to the common format (images, train-id PNG labels, split lists), convert
# your own data (dataset.source), or generate the shapes world.

from cascade_clip.data.registry import download_folders

OWN_SOURCE = config["dataset"].get("source")

if IS_SHAPES:

    rule make_shapes:
        output:
            f"{DATA_ROOT}/dataset.json",
        params:
            config=CONFIG,
            settings=settings("seed", "shapes", "dataset"),
            root=lambda wc, output: str(Path(output[0]).parent),
        log:
            f"{LOGS}/make_shapes.log",
        benchmark:
            f"{BENCH}/make_shapes.tsv"
        threads: 4  # the first job, nothing beside it; Snakemake gives it at most --cores
        resources:
            mem_mb=2000,
            runtime=30,
        conda:
            "../../environment.yml"
        shell:
            "cascade-clip make-shapes --config {params.config:q} --out {params.root:q} --workers {threads:q} "
            "> {log:q} 2>&1"


if OWN_SOURCE:

    rule prepare_own:
        input:
            [OWN_SOURCE[k] for k in ("images", "masks", "classes") if OWN_SOURCE.get(k)],
            list((OWN_SOURCE.get("splits") or {}).values()),
            list((OWN_SOURCE.get("annotations") or {}).values()),
        output:
            f"{DATA_ROOT}/dataset.json",
        params:
            config=CONFIG,
            settings=settings("dataset.source", "dataset.name"),
            root=lambda wc, output: str(Path(output[0]).parent),
        log:
            f"{LOGS}/prepare/{DATASET}.log",
        benchmark:
            f"{BENCH}/prepare/{DATASET}.tsv"
        threads: WF["threads"]
        resources:
            mem_mb=8000,
            runtime=6 * 60,
        conda:
            "../../environment.yml"
        shell:
            "cascade-clip prepare --config {params.config:q} --out {params.root:q} --workers {threads:q}"
            " > {log:q} 2>&1"


for _name, _root in DATA_ROOTS.items():
    if _name == "shapes" or (OWN_SOURCE and _name == DATASET):
        continue

    rule:
        name:
            f"prepare_{_name}"
        input:
            [f"{DOWNLOADS}/{folder}/.complete" for folder in download_folders(_name)],
        output:
            f"{_root}/dataset.json",
        params:
            downloads=lambda wc, input: str(Path(input[0]).parents[1]),  # DOWNLOADS
            dataset=_name,
            root=lambda wc, output: str(Path(output[0]).parent),
        log:
            f"{LOGS}/prepare/{_name}.log",
        benchmark:
            f"{BENCH}/prepare/{_name}.tsv"
        threads: WF["threads"]
        resources:
            mem_mb=8000,
            runtime=6 * 60,
        conda:
            "../../environment.yml"
        shell:
            "OMP_NUM_THREADS={threads:q} cascade-clip prepare --dataset {params.dataset:q}"
            " --downloads {params.downloads:q} --out {params.root:q} > {log:q} 2>&1"
