"""`remerge plan RECIPE PLAN_JSON`: plan a merge's output shards from the input headers alone.

The first stage of the merge by hand (`remerge merge` runs them all in one process):

    remerge plan RECIPE plan.json                      prints the shard file names, one a line
    remerge merge-shard plan.json RECIPE OUT/SHARD     once per name (any order, any machine)
    remerge assemble plan.json RECIPE OUT              the index and mergekit_config.yml
    remerge configs RECIPE OUT                         config.json and tokenizer files
    remerge card RECIPE OUT/README.md                  mergekit's card, titled OUT's name

The plan records each model's folder (absolute), so the later stages read no reference again.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from remerge.commands import add_models_dir_option, add_version_option
from remerge.hub.references import resolve_references
from remerge.merge.plan import DEFAULT_SHARD_SIZE, parse_size
from remerge.merge.recipe import load_recipe
from remerge.merge.releases import DEFAULT_VERSION
from remerge.stages import stage_plan

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, metavar="RECIPE", help="mergekit YAML recipe")
    p.add_argument("plan", type=Path, metavar="PLAN_JSON", help="the shard plan to write")
    add_version_option(p, f"whose semantics to follow (default: {DEFAULT_VERSION}, or the newest "
                   "release that accepted it for a recipe that lists a model twice); the later "
                   "stages follow the plan's")
    p.add_argument("--out-shard-size", default=str(DEFAULT_SHARD_SIZE),
                   help="maximum bytes per output shard, e.g. 5B, 500M, 20K (default 5B)")
    add_models_dir_option(p)


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.out_shard_size)
    recipe = load_recipe(args.recipe, version=args.mergekit_version)
    folders = {ref: Path(folder).absolute()
               for ref, folder in resolve_references(recipe.inputs, args.models_dir).items()}
    args.plan.parent.mkdir(parents=True, exist_ok=True)
    plan = stage_plan(recipe.text, recipe.release.version, folders, args.plan, size)
    log.info("wrote %s: %d shard(s), %.1f MB, following mergekit %s", args.plan, len(plan.shards),
             plan.total_size / 1e6, plan.version)
    for name in plan.shard_names:
        print(name)
    return 0
