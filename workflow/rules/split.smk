# Resolve the seen/unseen split (class names in config) against the dataset's classes.
# A name that is not a class of the dataset stops the workflow here, before any training;
# a registry dataset's classes are known before its download, and your own folder dataset's
# from its class-name file, so their names are checked as the workflow starts.

from cascade_clip.data.registry import DATASETS, check_unseen_names

if not IS_SHAPES and DATASET in DATASETS:
    check_unseen_names(DATASET, config["dataset"]["unseen"], where="the workflow config")
elif OWN_SOURCE and OWN_SOURCE.get("format") == "folder" and OWN_SOURCE.get("classes"):
    from cascade_clip.data.own import read_class_names

    check_unseen_names(DATASET, config["dataset"]["unseen"], read_class_names(OWN_SOURCE["classes"]),
                       where="the workflow config")


rule split:
    input:
        dataset_json(DATASET),
    output:
        f"{RESULTS}/split.json",
    params:
        config=CONFIG,
        settings=settings("dataset"),
    log:
        f"{LOGS}/split.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../environment.yml"
    shell:
        "cascade-clip split --config {params.config:q} --out {output:q} > {log:q} 2>&1"
