"""Write a merged model's index, mergekit_config.yml and tensor digests (rule assemble_model)."""
from pathlib import Path

from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.stages import stage_assemble

stage_assemble(
    plan_path=snakemake.input.plan,
    recipe_text=snakemake.params.recipe,
    model_dir=Path(snakemake.output.index).parent,
    digest_paths=snakemake.input.digests,
    tensors_path=snakemake.output.tensors,
    always_index=True,  # a fixed output of the rule, also for a lone shard
)
