# Cascade-CLIP zero-shot semantic segmentation workflow.
#
#   snakemake --cores all                                   # the embedded "shapes" demo
#   snakemake --cores all --resources gpu=4 --configfile config/coco_stuff.yaml
#   snakemake --report results/<experiment>/report.html     # after a run
#
# Every rule calls the `cascade-clip` CLI, so each stage also runs by hand.

from snakemake.utils import min_version, validate

from cascade_clip.config import config_from_dict

min_version("8.0")


# The embedded default, unless the command line names another config: Snakemake would
# otherwise merge the two, and the shapes world's keys would leak into a real experiment.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml", set_default=True)
# The CLI's validator on the same config (the schema again, then the cross-field checks),
# so the workflow and every stage accept exactly the same configs.
WORKFLOW_CONFIG = config_from_dict(config, "the workflow config")


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/pretrain_clip.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/text_embeddings.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/self_train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


rule all:
    input:
        rules.report.output,
    default_target: True
