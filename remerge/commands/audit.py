"""`remerge audit PUBLISHED OUT_DIR`: re-run a published merge from its recipe, compare bit by bit.

Exit status: 0 when the tensors are bit-identical (or, for a random method, consistent with the
recipe element by element), 1 when they differ, 2 on an error.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from remerge.commands import add_models_dir_option, add_version_option
from remerge.errors import AuditError
from remerge.provenance.audit import BIT_IDENTICAL, CONFIGS_DIFFER, CONSISTENT, run_audit

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("published", help="the published merge: a local folder or a hub id org/name[@rev]")
    p.add_argument("out_dir", type=Path, help="where audit.json and audit.md are written")
    p.add_argument("--recipe", type=Path, default=None,
                   help="recipe file (default: the published mergekit_config.yml or README card)")
    p.add_argument("--path-map", action="append", default=[], metavar="FROM=TO",
                   help="read model FROM (as the recipe names it) from TO (hub id or folder); FROM "
                   "may be a folder above several references (FROM/x is read from TO/x; the "
                   "longest FROM wins; '\\' or '/'); default: a local path's last two parts as a hub id")
    p.add_argument("--transplant-from", default=None, metavar="MODEL",
                   help="expect the json files of MODEL (a recipe reference or hub id), as after "
                   "the seed's config transplant")
    p.add_argument("--infer", action="store_true",
                   help="estimate the recipe from the weights (method and parameters), given the "
                   "possible parents (--candidate), and re-merge it; also done when the "
                   "published model has no recipe and candidates are given")
    p.add_argument("--candidate", action="append", default=[], metavar="MODEL",
                   help="a model the merge may come from (folder or hub id; path maps apply); repeat")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="with --infer: the base model of a task-vector merge (default: try each candidate)")
    add_version_option(p, "whose semantics to follow (default: the version in the published index)")
    add_models_dir_option(p)


def parse_map(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise AuditError(f"--path-map {item!r}: expected FROM=TO")
        src, dst = item.split("=", 1)
        out[src] = dst
    return out


def run(args: argparse.Namespace) -> int:
    report = run_audit(args.published, args.recipe, parse_map(args.path_map), args.transplant_from,
                       args.mergekit_version, args.models_dir, args.out_dir, infer=args.infer,
                       candidates=args.candidate, base=args.base)
    print(f"{args.published}: {report['verdict']}")
    return 0 if report["verdict"] in (BIT_IDENTICAL, CONFIGS_DIFFER, CONSISTENT) else 1
