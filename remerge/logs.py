"""Logging for workflow jobs: everything a job prints goes to its Snakemake log file."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def to_file(path: str) -> None:
    """Send stderr and logging (INFO and up) of this process to `path`, line-buffered."""
    stream = open(path, "w", buffering=1, encoding="utf-8")
    sys.stderr = stream
    logging.basicConfig(stream=stream, level=logging.INFO, format=FORMAT, datefmt="%H:%M:%S", force=True)
