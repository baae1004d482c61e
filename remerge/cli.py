"""The `remerge` command line: one sub-command per module in `remerge.commands`.

Each command module defines `add_arguments(parser)` and `run(args) -> int` (the exit status).
Modules are imported only when their command runs, so `remerge scores` never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from remerge import __version__
from remerge.errors import RemergeError

# command name -> (module under remerge.commands, one-line help), in `remerge --help` order
COMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("merge", "merge a mergekit YAML recipe into a model folder (mergekit-yaml drop-in)"),
    "plan": ("plan", "plan the output shards of a recipe (tensor list, shapes, shard cut)"),
    "merge-shard": ("merge_shard", "compute and write one output shard of a plan"),
    "assemble": ("assemble", "write the index and mergekit_config.yml of a planned merge"),
    "configs": ("configs", "write a merge's config/tokenizer files, or transplant another model's"),
    "download": ("download", "download a hub model at a pinned revision and verify its files"),
    "manifest": ("manifest", "record a local model folder's files and sha256 in a manifest"),
    "demo": ("demo", "build the embedded offline demo models (base and instruct)"),
    "evaluate": ("evaluate", "evaluate a model folder with lm-eval"),
    "scores": ("scores", "turn an lm-eval results file into the card and leaderboard tables"),
    "card": ("card", "write a merged model's card (README.md) and provenance.json"),
    "audit": ("audit", "re-run a published merge from its recipe and compare it bit by bit"),
    "grid": ("grid", "collect a grid's scores into grid.tsv and grid.png"),
}


def _load(name: str):
    return importlib.import_module(f"remerge.commands.{COMMANDS[name][0]}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remerge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"remerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen command's module is imported (its arguments are needed to parse argv).
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (_, text) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=text, description=text)
            continue
        module = _load(name)
        # the module docstring's paragraphs after its first line: the command's details
        details = (module.__doc__ or "").partition("\n")[2].strip("\n")
        p = sub.add_parser(name, help=text, description=text, epilog=details or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(_load(args.command).run(args) or 0)
    except RemergeError as err:
        print(f"remerge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
