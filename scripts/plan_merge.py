"""Plan a merge's output shards from the input headers (checkpoint plan_merge)."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.hub.manifest import model_folders
from remerge.merge.plan import parse_size
from remerge.stages import stage_plan

p = snakemake.params
stage_plan(p.recipe, p.version, model_folders(p.manifests), snakemake.output.plan,
           parse_size(p.out_shard_size))
