"""Write a merged model's index, mergekit_config.yml and tensor digests (rule assemble_model)."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.stages import assemble

assemble(
    plan_path=snakemake.input.plan,
    digest_paths=snakemake.input.digests,
    recipe_text=snakemake.params.recipe,
    index_path=snakemake.output.index,
    recipe_path=snakemake.output.recipe,
    tensors_path=snakemake.output.tensors,
)
