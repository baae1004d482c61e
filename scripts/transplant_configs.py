"""Write the merge's config/tokenizer files, then the optional transplant (rule transplant_configs)."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.stages import write_configs

p = snakemake.params
write_configs(
    recipe_text=p.recipe,
    version=p.version,
    manifests=p.manifests,
    donor_manifest=snakemake.input.donor[0] if snakemake.input.donor else None,
    donor_name=p.donor,
    config_path=snakemake.output.config,
    record_path=snakemake.output.record,
)
