"""Publish the demo's seed merge as an author would, and an altered copy (rule publish_demo)."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.demo.publish import publish_demo

p = snakemake.params
publish_demo(p.model_dir, p.recipe, p.author_paths, snakemake.output.passing, snakemake.output.altered)
