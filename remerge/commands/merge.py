"""`remerge merge RECIPE OUT_DIR`: a drop-in for `mergekit-yaml RECIPE OUT_DIR`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from remerge.commands import add_models_dir_option, add_version_option
from remerge.hub.references import resolve_references
from remerge.merge.plan import DEFAULT_SHARD_SIZE, parse_size
from remerge.merge.recipe import load_recipe
from remerge.stages import merge_model

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="mergekit YAML recipe")
    p.add_argument("out_dir", type=Path, help="output model folder")
    add_version_option(p)
    p.add_argument("--out-shard-size", default=str(DEFAULT_SHARD_SIZE),
                   help="maximum bytes per output shard, e.g. 5B, 500M, 20K (default 5B)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--random-seed", type=int, default=0,
                   help="seed of the random methods (DARE); each tensor's draws depend only on "
                   "the seed, the tensor's name and the recipe")
    add_models_dir_option(p)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, version=args.mergekit_version)
    log.info("%s merge of %d model(s), following mergekit %s", recipe.method.name,
             len(recipe.inputs), recipe.version)
    folders = resolve_references(recipe.inputs, args.models_dir)
    plan = merge_model(recipe, folders, args.out_dir, parse_size(args.out_shard_size),
                       threads=args.threads, seed=args.random_seed)
    log.info("wrote %s: %d shard(s), %.1f MB", args.out_dir, len(plan.shards), plan.total_size / 1e6)
    return 0
