"""Model references as recipes write them: local folders or hub ids (`org/name[@revision]`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from remerge.errors import RecipeError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def default_models_dir() -> Path:
    return Path(os.environ.get("REMERGE_MODELS", Path.home() / ".cache" / "remerge" / "models"))


def resolve_reference(ref: str, models_dir: Path | None = None, allow_patterns=None) -> Path:
    """A local folder as is; a hub id downloaded (verified) at its revision into `models_dir`."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    match = HUB_ID.match(ref)
    if match is None or ref.startswith(("/", ".", "~")):
        raise RecipeError(f"model {ref!r}: no such folder, and not a hub id like org/name[@revision]")
    from remerge.hub.download import download_model

    repo, rev = match["repo"], match["rev"] or "main"
    out = (models_dir or default_models_dir()) / repo.replace("/", "--") / rev.replace("/", "--")
    extra = {"allow_patterns": tuple(allow_patterns)} if allow_patterns else {}
    manifest = download_model(repo, rev, out, **extra)
    return Path(manifest["path"])


def resolve_references(refs: Iterable[str], models_dir: Path | None = None) -> dict[str, Path]:
    return {ref: resolve_reference(ref, models_dir) for ref in refs}
