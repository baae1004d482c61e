"""`remerge merge RECIPE OUT_DIR`: a drop-in for `mergekit-yaml RECIPE OUT_DIR`.

A RECIPE of several YAML documents is a multi-stage recipe, as `mergekit-multi` reads it: each
named stage is merged into INTERMEDIATE_DIR/<name>, in dependency order, and the final stage
(the document without `name:`) into OUT_DIR (`remerge.merge.multi`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from remerge.commands import add_models_dir_option, add_version_option
from remerge.errors import RecipeError
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
    p.add_argument("-I", "--intermediate-dir", default=None, metavar="INTERMEDIATE_DIR",
                   help="multi-stage recipes: where each named stage is written, as "
                   "INTERMEDIATE_DIR/<name> (mergekit-multi's -I; default: OUT_DIR.stages)")
    p.add_argument("--no-lazy", dest="lazy", action="store_false",
                   help="multi-stage recipes: merge every stage again, even one whose folder "
                   "holds what this run would write")


def run(args: argparse.Namespace) -> int:
    from remerge.merge.multi import is_multi_stage_file

    if is_multi_stage_file(args.recipe):
        return run_stages(args)
    recipe = load_recipe(args.recipe, version=args.mergekit_version)
    log.info("%s merge of %d model(s), following mergekit %s", recipe.method.name,
             len(recipe.inputs), recipe.version)
    folders = resolve_references(recipe.inputs, args.models_dir)
    plan = merge_model(recipe, folders, args.out_dir, parse_size(args.out_shard_size),
                       threads=args.threads, seed=args.random_seed)
    log.info("wrote %s: %d shard(s), %.1f MB", args.out_dir, len(plan.shards), plan.total_size / 1e6)
    return 0


def run_stages(args: argparse.Namespace) -> int:
    """A multi-stage file: every stage parsed and checked first, then merged in run order, the
    named ones to INTERMEDIATE_DIR/<name>, the final one to OUT_DIR. An intermediate that holds
    what this run would write, none of whose inputs was merged again, is kept (unless --no-lazy)."""
    from remerge.merge.multi import (is_current, layer_counts, split_stages, stage_config_yaml,
                                     stage_folder, stage_recipe)

    intermediate_dir = args.intermediate_dir or f"{args.out_dir}.stages"
    try:
        stages = split_stages(args.recipe.read_text(encoding="utf-8"), intermediate_dir)
        recipes = [stage_recipe(s, args.mergekit_version) for s in stages]
    except RecipeError as err:
        raise RecipeError(f"{args.recipe}: {err}") from None
    merged: set[str | None] = set()
    for stage, recipe in zip(stages, recipes):
        out = args.out_dir if stage.final else Path(stage_folder(intermediate_dir, stage.name))
        folders = resolve_references(recipe.inputs, args.models_dir)
        # the models' layer counts: mergekit-multi writes `models:` as slices over all layers
        layers = {} if "slices" in stage.data else layer_counts(recipe.inputs, folders)
        shown = stage_config_yaml(stage.data, layers)
        if args.lazy and not stage.final and not merged & set(stage.needs) and is_current(out, shown):
            log.info("%s: %s holds this stage already (same mergekit_config.yml), kept", stage.label, out)
            continue
        log.info("%s: %s merge of %d model(s) into %s, following mergekit %s", stage.label,
                 recipe.method.name, len(recipe.inputs), out, recipe.version)
        merge_model(recipe, folders, out, parse_size(args.out_shard_size), threads=args.threads,
                    seed=args.random_seed, shown_text=shown)
        merged.add(stage.name)
    log.info("wrote %s (%d stages)", args.out_dir, len(stages))
    return 0
