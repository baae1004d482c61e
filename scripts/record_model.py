"""Record a local (or demo) model folder's files and sha256 (rule record_model)."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.hub.manifest import local_manifest, write_manifest

write_manifest(local_manifest(snakemake.input.folder), snakemake.output.manifest)
