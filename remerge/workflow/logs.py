"""Logging for workflow jobs: everything a job prints goes to its Snakemake log file."""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import TextIO

from remerge.errors import RemergeError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("remerge")


def to_file(path: str) -> None:
    """Send stderr and logging (INFO and up) of this process to `path`, line-buffered.

    A job that ends with a RemergeError (bad input; its message names the item and the fix)
    logs that message as its last line and also prints it to the terminal, beside Snakemake's
    "Error in rule"; any other exception leaves its full traceback in the log."""
    terminal = sys.stderr
    stream = open(path, "w", buffering=1, encoding="utf-8")
    sys.stderr = stream
    logging.basicConfig(stream=stream, level=logging.INFO, format=FORMAT, datefmt="%H:%M:%S", force=True)
    sys.excepthook = lambda kind, err, tb: report_failure(kind, err, tb, terminal)


def report_failure(kind: type[BaseException], err: BaseException, tb: TracebackType | None,
                   terminal: TextIO) -> None:
    """The job's uncaught exception: one line for a user's error, a traceback for a bug."""
    if not isinstance(err, RemergeError):
        sys.__excepthook__(kind, err, tb)  # to sys.stderr, the log
        return
    log.error("%s", err)
    print(f"remerge: error: {err}", file=terminal, flush=True)
