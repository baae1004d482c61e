"""Write a merged model's card and provenance.json (rule write_model_card)."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.stages import write_card_and_provenance

inp, p = snakemake.input, snakemake.params
write_card_and_provenance(
    name=p.name,
    recipe_path=inp.recipe,
    version=p.version,
    manifests=p.manifests,
    names=p.names,
    licenses=p.licenses,
    tensors_path=inp.tensors,
    configs_path=inp.configs,
    scores_path=inp.scores if inp.scores else None,
    grid_point=p.point,
    card_path=snakemake.output.card,
    provenance_path=snakemake.output.provenance,
)
