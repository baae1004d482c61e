"""Record a merge's output folder as the input of a later merge (rule record_stage): every file
but README.md, which the card job writes after (with the scores) and no later stage reads."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.hub.manifest import local_manifest, write_manifest

write_manifest(
    local_manifest(snakemake.params.folder, exclude=("README.md",)),
    snakemake.output.manifest,
)
