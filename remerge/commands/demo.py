"""`remerge demo OUT_DIR [--seed N]`: build the embedded offline demo models."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        type=Path,
        help="folder that receives base/ and instruct/ (replaced when present)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights and the training batches (default: 0); same seed, same bytes",
    )


def run(args: argparse.Namespace) -> int:
    from remerge.demo.models import build_demo_models  # torch and transformers: only when needed

    build_demo_models(args.out_dir, seed=args.seed)
    for name in ("base", "instruct"):
        print(args.out_dir / name)
    return 0
