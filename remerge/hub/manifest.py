"""Per-model manifests: where a model came from and the size and sha256 of each of its files.

The format (`docs/ARCHITECTURE.md`):

    {"format": "remerge.manifest/1", "source": "hub" | "local",
     "repo_id": ..., "requested_revision": ..., "commit": ...,   # null for a local folder
     "path": "results/models/instruct/snapshot",                   # the folder holding the files
     "files": [{"path": "config.json", "size": 123, "sha256": "<64 hex>"}, ...]}

Files are sorted by path (relative to the folder, `/`-separated) and nothing depends on the
clock, so two runs over the same files write byte-identical manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from remerge.errors import ModelError

FORMAT = "remerge.manifest/1"
MANIFEST_NAME = "manifest.json"
SOURCES = ("hub", "local")
KEYS = ("format", "source", "repo_id", "requested_revision", "commit", "path", "files")
_CHUNK = 8 << 20  # 8 MiB reads: weight shards are GiBs, memory stays flat
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def hash_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's content, as 64 lowercase hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(folder: str | os.PathLike[str], path: str) -> dict:
    """The manifest entry of `folder/path`, hashed now."""
    local = Path(folder, path)
    return {"path": path, "size": local.stat().st_size, "sha256": hash_file(local)}


def new_manifest(
    folder: str | os.PathLike[str],
    files: Iterable[dict],
    *,
    repo_id: str | None = None,
    requested_revision: str | None = None,
    commit: str | None = None,
) -> dict:
    """A manifest of `files` (entries as `file_entry` makes them) in `folder`.

    With a `repo_id` the source is "hub" and `commit` is required; without, it is "local".
    """
    manifest = {
        "format": FORMAT,
        "source": "hub" if repo_id is not None else "local",
        "repo_id": repo_id,
        "requested_revision": requested_revision,
        "commit": commit,
        "path": Path(folder).as_posix(),
        "files": sorted(
            ({"path": f["path"], "size": f["size"], "sha256": f["sha256"]} for f in files), key=_path
        ),
    }
    check_manifest(manifest, "the new manifest")
    return manifest


def local_manifest(folder: str | os.PathLike[str], exclude: Iterable[str] = ()) -> dict:
    """The manifest of a local model folder: every file under it, hashed here.

    Hidden files and folders (`.cache/`, `.git/`, ...) are tool bookkeeping, not the model, and
    are left out, as are the `exclude` paths (relative, e.g. a manifest written inside `folder`).
    Symbolic links are followed (a huggingface_hub cache snapshot is made of them).
    """
    root = Path(folder)
    if not root.is_dir():
        raise ModelError(f"{root}: not a folder; give the folder that holds the model's files")
    skip = set(exclude)
    paths = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    files = [file_entry(root, p) for p in sorted(paths) if p not in skip]
    if not files:
        raise ModelError(f"{root}: the folder holds no files; give the folder that holds the model's files")
    return new_manifest(root, files)


def write_manifest(manifest: dict, path: str | os.PathLike[str]) -> None:
    """Write `manifest` to `path` atomically: a temporary file in the same folder, then `os.replace`."""
    target = Path(path)
    check_manifest(manifest, str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2) + "\n"
    # A unique name opened with "x" (not mkstemp, whose 0600 mode would stick): the umask applies.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_manifest(path: str | os.PathLike[str]) -> dict:
    """Read and validate a manifest; a broken one raises `ModelError` naming the file."""
    source = Path(path)
    try:
        manifest = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"{source}: no such manifest; run `remerge download` or `remerge manifest` first"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{source}: cannot read the manifest ({err}); {_REGENERATE}") from None
    check_manifest(manifest, str(source))
    return manifest


def verify_manifest(manifest: dict, folder: str | os.PathLike[str] | None = None) -> None:
    """Re-hash every listed file in `folder` (default: the manifest's `path`); raise on a difference.

    Files present in the folder but not listed are not checked.
    """
    root = Path(manifest["path"] if folder is None else folder)
    for entry in manifest["files"]:
        local = root / entry["path"]
        if not local.is_file():
            raise ModelError(f"{local}: listed in the manifest but missing; {_REFETCH}")
        size = local.stat().st_size
        if size != entry["size"]:
            raise ModelError(f"{local}: {size} bytes, the manifest records {entry['size']}; {_REFETCH}")
        actual = hash_file(local)
        if actual != entry["sha256"]:
            raise ModelError(
                f"{local}: sha256 {actual} differs from the manifest's {entry['sha256']}; the file changed "
                f"after the manifest was written; {_REFETCH}"
            )


_REGENERATE = "rebuild it with `remerge download` (hub models) or `remerge manifest` (local folders)"
_REFETCH = (
    "download the model again, or rebuild the manifest with `remerge manifest` if the change is intended"
)


def check_manifest(manifest: object, where: str) -> None:
    """Raise `ModelError` naming `where` unless `manifest` has exactly the documented shape."""
    problem = _problem(manifest)
    if problem:
        raise ModelError(f"{where}: not a valid {FORMAT} manifest: {problem}; {_REGENERATE}")


def _problem(m: object) -> str | None:
    """What is wrong with a manifest, or None."""
    if not isinstance(m, dict):
        return "the top level is not a JSON object"
    if sorted(m) != sorted(KEYS):
        return f"its keys are {sorted(m)}, expected {list(KEYS)}"
    if m["format"] != FORMAT:
        return f"format is {m['format']!r}"
    if m["source"] not in SOURCES:
        return f"source is {m['source']!r}, expected one of {list(SOURCES)}"
    if not isinstance(m["path"], str) or not m["path"]:
        return "path is not a folder name"
    if m["source"] == "hub":
        if not isinstance(m["repo_id"], str) or not isinstance(m["requested_revision"], str):
            return "a hub manifest needs repo_id and requested_revision"
        if not isinstance(m["commit"], str) or not _COMMIT.fullmatch(m["commit"]):
            return f"commit {m['commit']!r} is not a 40-hex commit id"
    elif (m["repo_id"], m["requested_revision"], m["commit"]) != (None, None, None):
        return "a local manifest has null repo_id, requested_revision and commit"
    return _files_problem(m["files"])


def _files_problem(files: object) -> str | None:
    if not isinstance(files, list) or not files:
        return "files is not a non-empty list"
    for f in files:
        if not isinstance(f, dict) or sorted(f) != ["path", "sha256", "size"]:
            return f"file entry {f!r} does not have exactly path, size and sha256"
        path = f["path"]
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
            return f"file path {path!r} is not relative to the folder"
        if not isinstance(f["size"], int) or isinstance(f["size"], bool) or f["size"] < 0:
            return f"{path}: size {f['size']!r} is not a byte count"
        if not isinstance(f["sha256"], str) or not _SHA256.fullmatch(f["sha256"]):
            return f"{path}: sha256 {f['sha256']!r} is not 64 lowercase hex digits"
    paths = [f["path"] for f in files]
    if paths != sorted(set(paths)):
        return "files are not sorted by path, or a path repeats"
    return None


def _path(entry: dict) -> str:
    return entry["path"]


def model_folders(manifests: Mapping[str, str]) -> dict[str, Path]:
    """{model reference: folder} from {model reference: manifest path}."""
    return {ref: Path(read_manifest(path)["path"]) for ref, path in manifests.items()}
