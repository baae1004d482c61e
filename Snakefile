# remerge: reproduce, sweep and audit published LLM weight merges.
#
#   snakemake --cores 8                          the embedded offline demo (config/config.yaml)
#   snakemake --cores 8 --configfile config/supernova_lite.yaml     the seed, from the hub
#   snakemake --report results/report.html       grid tables and plots with captions
from snakemake.utils import min_version

min_version("9.0")


# The demo unless --configfile names another (which then replaces it rather than extending it).
if not config:

    configfile: "config/config.yaml"


report: "report/workflow.rst"


localrules:
    all,


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/merge.smk"
include: "rules/transplant.smk"
include: "rules/evaluate.smk"
include: "rules/card.smk"
include: "rules/grid.smk"
include: "rules/audit.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
