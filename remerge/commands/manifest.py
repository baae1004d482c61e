"""`remerge manifest FOLDER --out FILE`: record a local model folder's files and their sha256.

The manifest has the same format as a download's (source "local", no repo or commit), so a
local folder can stand wherever a hub model can. See `remerge.hub.manifest`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from remerge.hub.manifest import local_manifest, write_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", type=Path, help="the model folder")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE", help="the manifest to write")


def run(args: argparse.Namespace) -> int:
    out, folder = args.out.resolve(), args.folder.resolve()
    # A manifest written inside the folder it describes must not list itself.
    exclude = [out.relative_to(folder).as_posix()] if out.is_relative_to(folder) else []
    manifest = local_manifest(args.folder, exclude=exclude)
    write_manifest(manifest, args.out)
    print(f"{args.folder}: {len(manifest['files'])} files recorded in {args.out}")
    return 0
