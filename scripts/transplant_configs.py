"""Write the merge's config/tokenizer files, then the optional transplant (rule transplant_configs)."""
from pathlib import Path

from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.hub.manifest import model_folders, read_manifest
from remerge.stages import stage_configs

p, inp = snakemake.params, snakemake.input
stage_configs(
    recipe_text=p.recipe,
    version=p.version,
    folders=model_folders(p.manifests),
    model_dir=Path(snakemake.output.config).parent,
    transplant_from=read_manifest(inp.donor[0])["path"] if inp.donor else None,
    donor_name=p.donor,
    record_path=snakemake.output.record,
)
