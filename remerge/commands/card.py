"""`remerge card RECIPE CARD_PATH`: write a merged model's card (README.md) and provenance.json.

Without `--provenance`, the card is mergekit's (as `remerge merge` writes it). With it, the
card is the workflow's: mergekit's extended with the inputs' pinned files, the output's tensor
digest, the config transplant and the scores, all also recorded in provenance.json. Its inputs
come from the other commands: `remerge download` or `remerge manifest` (one manifest per
recipe model), `remerge assemble --tensors`, `remerge configs --record`, `remerge scores --out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from remerge.commands import add_version_option
from remerge.errors import ModelError
from remerge.merge.model_files import donor
from remerge.merge.recipe import load_recipe
from remerge.stages import CARD_NAME, ProvenanceFiles, stage_card


def pair(text: str) -> tuple[str, str]:
    """An argparse type: `KEY=VALUE` (the key is all before the first `=`)."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


def read_json(path: Path, what: str, fix: str) -> Any:
    """A JSON file's content; an unreadable one raises ModelError naming it and the fix."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: no such {what}; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"{path}: cannot read the {what} ({err}); {fix}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, metavar="RECIPE", help="mergekit YAML recipe")
    p.add_argument("card", type=Path, metavar="CARD_PATH",
                   help=f"the card to write (a folder: its {CARD_NAME})")
    p.add_argument("--name", default=None,
                   help="the model's name in the card (default: the name of CARD_PATH's folder, "
                   "as `remerge merge` titles it)")
    add_version_option(p)
    g = p.add_argument_group("the workflow's card, with provenance.json")
    g.add_argument("--provenance", type=Path, default=None, metavar="FILE",
                   help="write remerge's card, and provenance.json here")
    g.add_argument("--manifest", type=pair, action="append", default=[], metavar="MODEL=FILE",
                   help="the manifest of a recipe model (as the recipe names it); one for each")
    g.add_argument("--tensors", type=Path, default=None, metavar="FILE",
                   help="tensors.json (`remerge assemble --tensors`)")
    g.add_argument("--configs", type=Path, default=None, metavar="FILE",
                   help="configs.json (`remerge configs --record`)")
    g.add_argument("--scores", type=Path, default=None, metavar="FILE",
                   help="scores.json (`remerge scores --out`), if evaluated")
    g.add_argument("--model-name", type=pair, action="append", default=[], metavar="MODEL=NAME",
                   help="a recipe model's short name, recorded beside its reference")
    g.add_argument("--license", default=None,
                   help="the card's licence (default: the base model's card's, if it has one)")
    g.add_argument("--point", type=pair, action="append", default=[], metavar="KEY=VALUE",
                   help="the grid point's value of KEY, recorded in provenance.json")


def provenance_files(args: argparse.Namespace, recipe) -> ProvenanceFiles:
    manifests = dict(args.manifest)
    unknown = [ref for ref in manifests if ref not in recipe.inputs]
    if unknown:
        raise ModelError(f"--manifest {unknown[0]}: not a model of the recipe {args.recipe} "
                         f"(it has {', '.join(recipe.inputs)})")
    lacking = [ref for ref in recipe.inputs if ref not in manifests]
    if lacking:
        raise ModelError(f"--provenance needs --manifest MODEL=FILE for every recipe model; "
                         f"none for {', '.join(lacking)}")
    for option, path in (("--tensors", args.tensors), ("--configs", args.configs)):
        if path is None:
            raise ModelError(f"--provenance needs {option} FILE")
    read_json(args.tensors, "tensors record", "write it with `remerge assemble --tensors`")
    read_json(args.configs, "configs record", "write it with `remerge configs --record`")
    if args.scores is not None:
        read_json(args.scores, "scores file", "write it with `remerge scores --out`")
    return ProvenanceFiles(
        manifests={ref: str(path) for ref, path in manifests.items()},
        names=dict(args.model_name),
        licenses={donor(recipe): args.license},
        tensors=str(args.tensors),
        configs=str(args.configs),
        scores=str(args.scores) if args.scores is not None else None,
        grid_point=dict(args.point),
        out=str(args.provenance),
    )


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, version=args.mergekit_version)
    card = args.card / CARD_NAME if args.card.is_dir() else args.card
    name = args.name or card.absolute().parent.name
    provenance = None
    if args.provenance is not None:
        provenance = provenance_files(args, recipe)
        args.provenance.parent.mkdir(parents=True, exist_ok=True)
    elif args.manifest or args.tensors or args.configs or args.scores or args.model_name \
            or args.license or args.point:
        raise ModelError("--manifest, --tensors, --configs, --scores, --model-name, --license and "
                         "--point make the workflow's card: add --provenance FILE")
    card.parent.mkdir(parents=True, exist_ok=True)
    stage_card(recipe.text, recipe.release.version, name, card, provenance)
    return 0
