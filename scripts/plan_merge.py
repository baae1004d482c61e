"""Plan a merge's output shards from the input headers (checkpoint plan_merge)."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from remerge.io.files import write_text_atomic
from remerge.stages import model_folders
from remerge.merge.engine import plan_merge
from remerge.merge.plan import parse_size
from remerge.merge.recipe import parse_recipe

p = snakemake.params
recipe = parse_recipe(p.recipe, version=p.version)
plan = plan_merge(recipe, model_folders(p.manifests), parse_size(p.out_shard_size))
write_text_atomic(snakemake.output.plan, plan.to_json())
