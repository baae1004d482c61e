"""Download a hub model at a pinned revision and verify it (rule download_model)."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.hub.download import download_model

p = snakemake.params
download_model(p.repo, p.revision, p.out_dir)
