"""`remerge merge-shard PLAN_JSON RECIPE SHARD_PATH`: compute and write one output shard of a plan.

SHARD_PATH's file name says which shard: one of the names `remerge plan` printed. The model
folders are the plan's. Each shard is a job of its own: run them in any order, on any machine
that sees the model folders.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from remerge.commands import add_version_option
from remerge.merge.plan import Plan
from remerge.merge.recipe import load_recipe
from remerge.stages import stage_shard


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", type=Path, metavar="PLAN_JSON", help="the shard plan (`remerge plan`)")
    p.add_argument("recipe", type=Path, metavar="RECIPE", help="the recipe the plan was made from")
    p.add_argument("shard", type=Path, metavar="SHARD_PATH",
                   help="the shard to write, named as the plan names it "
                   "(e.g. OUT/model-00001-of-00002.safetensors)")
    p.add_argument("--digests", type=Path, default=None, metavar="FILE",
                   help="also write the sha256 of each of the shard's tensors (for `remerge "
                   "assemble --tensors`)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--random-seed", type=int, default=0,
                   help="seed of the random methods (DARE); give every shard the same one")
    add_version_option(p, "whose semantics to follow (default: the plan's)")


def run(args: argparse.Namespace) -> int:
    plan = Plan.read(args.plan)
    recipe = load_recipe(args.recipe, version=args.mergekit_version or plan.version)
    for path in (args.shard, args.digests):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    stage_shard(args.plan, recipe.text, recipe.release.version, args.shard,
                digests_path=args.digests, threads=args.threads, seed=args.random_seed)
    return 0
