"""Compute and write one output shard of a merge (rule merge_shard)."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.stages import stage_shard

stage_shard(
    plan_path=snakemake.input.plan,
    recipe_text=snakemake.params.recipe,
    version=snakemake.params.version,
    shard_path=snakemake.output.shard,
    digests_path=snakemake.output.digests,
    threads=snakemake.threads,
    seed=snakemake.params.seed,
)
