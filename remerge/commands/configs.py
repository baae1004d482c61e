"""`remerge configs RECIPE MODEL_DIR`: write a merge's config/tokenizer files, or transplant another model's.

config.json and the tokenizer files are mergekit's: from the base model (else the first
model), the only model this step reads, unless the recipe merges tokenizers or sets a chat
template (then every model of the recipe). `--transplant-from` then replaces every .json but the
index with that model's, as the workflow's `transplant_from` does.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from remerge.commands import add_models_dir_option, add_version_option
from remerge.hub.references import resolve_reference
from remerge.merge.model_files import donor
from remerge.merge.recipe import load_recipe
from remerge.merge.tokenizer import writes_tokenizer
from remerge.stages import stage_configs

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, metavar="RECIPE", help="mergekit YAML recipe")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="the merged model folder")
    p.add_argument("--transplant-from", default=None, metavar="MODEL",
                   help="then copy every .json but the index from MODEL (a folder, or a hub id "
                   "org/name[@rev], downloaded)")
    p.add_argument("--record", type=Path, default=None, metavar="FILE",
                   help="write which file came from which model, and its sha256 (configs.json)")
    add_version_option(p)
    add_models_dir_option(p)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, version=args.mergekit_version)
    refs = recipe.inputs if writes_tokenizer(recipe) else (donor(recipe),)
    folders = {ref: resolve_reference(ref, args.models_dir) for ref in refs}
    donor_dir = (resolve_reference(args.transplant_from, args.models_dir)
                 if args.transplant_from is not None else None)
    args.model_dir.mkdir(parents=True, exist_ok=True)
    if args.record is not None:
        args.record.parent.mkdir(parents=True, exist_ok=True)
    record = stage_configs(recipe.text, recipe.release.version, folders, args.model_dir,
                           transplant_from=donor_dir, donor_name=args.transplant_from,
                           record_path=args.record)
    for name, entry in record["files"].items():
        log.info("%s: %s from %s", args.model_dir, name, entry["from"])
    return 0
