"""`remerge download REPO --revision REV --out DIR`: a hub model at a pinned commit, verified.

DIR/snapshot/ receives the files (safetensors weights, json configs, tokenizer files), and
DIR/manifest.json (repo, requested revision, resolved commit, each file's size and sha256) is
written last, only when every file matches the hub's checksums. See `remerge.hub.download`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from remerge.errors import DownloadError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo_id", metavar="REPO", help="hub repository id, owner/name")
    parser.add_argument(
        "--revision", default="main", help="branch, tag or 40-character commit id (default: main)"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="output folder: DIR/snapshot/ receives the files, DIR/manifest.json is written last",
    )
    parser.add_argument(
        "--token-env",
        default="HF_TOKEN",
        metavar="NAME",
        help="environment variable holding a hub token, for gated or private repositories "
        "(default: HF_TOKEN); the token is never printed or written",
    )


def run(args: argparse.Namespace) -> int:
    from remerge.hub.download import download_model  # imported here: huggingface_hub is slow to import

    if not args.verbose:  # one INFO line per HTTP request would bury the messages that matter
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    token = os.environ.get(args.token_env) or None
    if token is None and args.token_env != "HF_TOKEN":
        raise DownloadError(f"--token-env {args.token_env}: that environment variable is not set; export it")
    manifest = download_model(args.repo_id, args.revision, args.out, token=token)
    count = len(manifest["files"])
    print(f"{manifest['repo_id']} {manifest['commit']}: {count} files verified in {manifest['path']}")
    return 0
