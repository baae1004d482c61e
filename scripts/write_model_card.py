"""Write a merged model's card and provenance.json (rule write_model_card)."""
from pathlib import Path

from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.stages import ProvenanceFiles, stage_card

inp, p = snakemake.input, snakemake.params
stage_card(
    recipe_text=Path(inp.recipe).read_text(encoding="utf-8"),
    version=p.version,
    name=p.name,
    card_path=snakemake.output.card,
    provenance=ProvenanceFiles(
        manifests=p.manifests,
        names=p.names,
        licenses=p.licenses,
        tensors=inp.tensors,
        configs=inp.configs,
        scores=inp.scores if inp.scores else None,
        grid_point=p.point,
        out=snakemake.output.provenance,
        stages=p.stages,
    ),
)
