"""Small-file helpers without torch: atomic writes and sha256."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write under a temporary name in the same folder, fsync, then rename into place:
    a reader (or a later run) sees the old file or the complete new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove what killed writers of `path` left behind: the temporary `.{name}.tmp-<pid>`
    files (or folders) next to it, which `os.replace` never moved into place. Call it only
    where nothing else can be writing `path` now (a workflow job owns its outputs)."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.tmp-*"))
    for tmp in stale:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return stale


def clear_stale(*outputs: str | Path | None) -> None:
    """Remove the temporaries a killed earlier attempt of a job left next to its outputs
    (a half-written shard can be gigabytes; nothing would ever remove it otherwise)."""
    for output in outputs:
        if output is not None:
            for tmp in remove_stale_temporaries(output):
                log.info("removed %s, left by an interrupted earlier run", tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
