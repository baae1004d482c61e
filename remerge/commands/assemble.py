"""`remerge assemble PLAN_JSON RECIPE MODEL_DIR`: write the index and mergekit_config.yml of a planned merge.

Run it once every shard of the plan is in MODEL_DIR (`remerge merge-shard`). With `--tensors`,
it also records every tensor's sha256 and their digest, from the shards' `--digests` files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from remerge.commands.card import read_json
from remerge.errors import ModelError
from remerge.merge.plan import Plan
from remerge.merge.recipe import load_recipe
from remerge.stages import stage_assemble


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", type=Path, metavar="PLAN_JSON", help="the shard plan (`remerge plan`)")
    p.add_argument("recipe", type=Path, metavar="RECIPE", help="the recipe the plan was made from")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="the folder holding the shards")
    p.add_argument("--digests", type=Path, nargs="+", action="extend", default=[], metavar="FILE",
                   help="the shards' digest files (`remerge merge-shard --digests`); with --tensors")
    p.add_argument("--tensors", type=Path, default=None, metavar="FILE",
                   help="write every tensor's sha256 and their digest here (tensors.json)")
    p.add_argument("--always-index", action="store_true",
                   help="write model.safetensors.index.json for a lone shard too (by default, as "
                   "the release writes it)")


def run(args: argparse.Namespace) -> int:
    plan = Plan.read(args.plan)
    recipe = load_recipe(args.recipe, version=plan.version)
    plan.check_recipe(recipe)
    missing = [name for name in plan.shard_names if not (args.model_dir / name).is_file()]
    if missing:
        raise ModelError(f"{args.model_dir} lacks shard(s) {', '.join(missing)} of the plan "
                         f"{args.plan}: write them with `remerge merge-shard` first")
    if args.digests and args.tensors is None:
        raise ModelError("--digests are read only with --tensors FILE: name the tensors.json to write")
    if args.tensors is not None and not args.digests:
        raise ModelError(f"--tensors {args.tensors} needs --digests: the digest file of every shard "
                         "(`remerge merge-shard --digests`)")
    for path in args.digests:
        read_json(path, "digest file", "re-run its `remerge merge-shard --digests`")
    if args.tensors is not None:
        args.tensors.parent.mkdir(parents=True, exist_ok=True)
    stage_assemble(args.plan, recipe.text, args.model_dir, digest_paths=args.digests,
                   tensors_path=args.tensors, always_index=args.always_index)
    return 0
