"""One module per `remerge` command (`add_arguments(parser)`, `run(args) -> int`), and the
options several commands share."""

from __future__ import annotations

import argparse
from pathlib import Path

from remerge.merge.releases import DEFAULT_VERSION, DUPLICATES_VERSION, RELEASES, VERSIONS

RECIPE_VERSION_HELP = (f"whose semantics to follow (default: {DEFAULT_VERSION}, or "
                       f"{DUPLICATES_VERSION}, which accepted it, for a recipe that lists a model twice)")
# every release with a record is a choice; the help says which were never run
_UNVERIFIED = ", ".join(v for v, r in RELEASES.items() if not r.verified)


def add_version_option(p: argparse.ArgumentParser, help: str = RECIPE_VERSION_HELP) -> None:
    """`--mergekit-version`: the mergekit release whose semantics to follow."""
    p.add_argument("--mergekit-version", choices=VERSIONS, default=None, metavar="VERSION",
                   help=f"{help}; one of {', '.join(VERSIONS)} (not checked against the real "
                        f"release, which PyPI lacks: {_UNVERIFIED})")


def add_models_dir_option(p: argparse.ArgumentParser) -> None:
    """`--models-dir`: where hub models are downloaded."""
    from remerge.hub.references import default_models_dir

    p.add_argument("--models-dir", type=Path, default=None,
                   help=f"where hub models are downloaded (default: {default_models_dir()})")
