"""Download a hub model at a pinned commit and prove that its files are the hub's.

huggingface_hub checks sizes but not contents, and a branch can move while files download, so:

1. resolve the revision (branch, tag or commit) to a commit id (`HfApi.model_info`);
2. list that commit's files (`HfApi.list_repo_tree`: size, git blob id, LFS sha256);
3. pick the files a merge needs (safetensors weights, json configs, tokenizer files), refusing a
   repository whose only weights are pickles;
4. `snapshot_download` them *at the commit*, into `<out_dir>/snapshot`;
5. delete files that are not part of that selection, check every file's size and hash against
   the listing (sha256 for LFS files, git blob id for the others) and delete any that differ;
6. write `<out_dir>/manifest.json` last, atomically: it exists only if every file checked out.

Layout of `out_dir`:

    manifest.json      the manifest (remerge.hub.manifest); the workflow's output
    snapshot/          the model files, exactly those in the manifest (huggingface_hub `local_dir`)
    snapshot/.cache/   huggingface_hub's bookkeeping (each file's commit and etag); not in the manifest
    hub-listing.json   the hub's listing at the commit, so that an offline run can still verify

With `HF_HUB_OFFLINE=1` nothing is fetched: the files already in `snapshot/` are checked against
`hub-listing.json` from an earlier run, and a missing file is an error that says what to do.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils.sha import git_hash

from remerge.errors import DownloadError
from remerge.hub.manifest import MANIFEST_NAME, hash_file, new_manifest, write_manifest

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshot"
LISTING_NAME = "hub-listing.json"

# What a merge and its evaluation read: weights and their index, configs, and tokenizer files
# (tokenizer.json/vocab.json are json; merges.txt for BPE, vocab.txt for WordPiece, *.model for
# sentencepiece, *.tiktoken, and chat_template.jinja where transformers keeps the chat template).
DEFAULT_ALLOW_PATTERNS = (
    "*.safetensors",
    "*.json",
    "*.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
)

# Weight formats that are pickles: loading one can run arbitrary code.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")

# Never fetched, whatever allow_patterns say: pickles, weights of other runtimes, remote code,
# and anything in a subfolder (e.g. Meta's original/ with consolidated .pth): a transformers
# model lives in the repository's top folder.
NEVER_FETCH = ("*/*", *PICKLE_PATTERNS, "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.py")


@dataclass(frozen=True)
class HubFile:
    """One file of a commit as the hub lists it."""

    path: str
    size: int
    git_sha1: str  # git blob id: of the content for plain files, of the pointer for LFS files
    sha256: str | None = None  # LFS files: the sha256 of the content


@dataclass(frozen=True)
class HubListing:
    """The files of `repo_id` at `commit`, which `requested_revision` resolved to."""

    repo_id: str
    requested_revision: str
    commit: str
    files: dict[str, HubFile]


@dataclass
class _Attempt:
    """What error messages need to know about the download in progress."""

    repo_id: str
    revision: str
    endpoint: str
    out_dir: Path
    listing: HubListing | None = None
    wanted: list[str] = field(default_factory=list)

    @property
    def snapshot(self) -> Path:
        return self.out_dir / SNAPSHOT_DIR

    @property
    def at(self) -> str:
        """`org/name at 'main', commit 0123abcd4567`, as far as known."""
        commit = f", commit {self.listing.commit[:12]}" if self.listing else ""
        return f"{self.repo_id} at {self.revision!r}{commit}"

    def missing(self) -> list[str]:
        return [p for p in self.wanted if not (self.snapshot / p).is_file()]


def download_model(
    repo_id: str,
    revision: str,
    out_dir: str | os.PathLike[str],
    token: str | None = None,
    endpoint: str | None = None,
    allow_patterns: Sequence[str] = DEFAULT_ALLOW_PATTERNS,
) -> dict:
    """Download `repo_id` at `revision` into `out_dir`, verify every file, and return the manifest.

    `token` defaults to the `HF_TOKEN` environment variable (then to a token saved by `hf auth
    login`); it is sent to the hub only, never printed or written. `endpoint` defaults to
    `HF_ENDPOINT`. Any failure raises `DownloadError` and leaves no manifest.
    """
    attempt = _Attempt(repo_id, revision, endpoint or constants.ENDPOINT, Path(out_dir))
    manifest_path = attempt.out_dir / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)  # a failed run must not leave the previous run's manifest
    token = token or os.environ.get("HF_TOKEN") or None
    try:
        listing, files = _download_and_verify(attempt, token, allow_patterns)
    except (OSError, httpx2.HTTPError, HFValidationError) as err:
        raise _explain(err, attempt) from err
    manifest = new_manifest(
        attempt.snapshot, files, repo_id=repo_id, requested_revision=revision, commit=listing.commit
    )
    write_manifest(manifest, manifest_path)
    log.info("%s: %d files verified, manifest %s", attempt.at, len(files), manifest_path)
    return manifest


def _download_and_verify(
    attempt: _Attempt, token: str | None, allow_patterns: Sequence[str]
) -> tuple[HubListing, list[dict]]:
    """Steps 1-5 of the module docstring; returns the listing and the manifest's file entries.

    Fills in `attempt` as it goes, for the error messages.
    """
    offline = constants.is_offline_mode()
    if offline:
        listing = read_listing(attempt.out_dir / LISTING_NAME, attempt.repo_id, attempt.revision)
        if listing is None:
            raise DownloadError(_never_downloaded(attempt))
    else:
        api = HfApi(endpoint=attempt.endpoint, token=token)
        listing = hub_listing(api, attempt.repo_id, attempt.revision)
        write_listing(listing, attempt.out_dir / LISTING_NAME)
    attempt.listing = listing
    attempt.wanted = select_files(listing, allow_patterns)
    if offline and attempt.missing():
        raise DownloadError(_offline_missing(attempt))
    if not offline:
        snapshot_download(
            attempt.repo_id,
            revision=listing.commit,  # the commit, not the branch: it cannot move under us
            local_dir=attempt.snapshot,
            allow_patterns=list(allow_patterns),
            ignore_patterns=list(NEVER_FETCH),
            token=token,
            endpoint=attempt.endpoint,
        )
    remove_strays(attempt.snapshot, attempt.wanted)
    return listing, verify_files(attempt.snapshot, listing, attempt.wanted)


# -- the hub's listing -------------------------------------------------------------------------


def hub_listing(api: HfApi, repo_id: str, revision: str) -> HubListing:
    """Resolve `revision` to a commit and list that commit's files (two API calls)."""
    commit = api.model_info(repo_id, revision=revision).sha
    if commit is None:  # every hub answers with a sha; guard against a proxy that strips it
        raise DownloadError(f"{repo_id} at {revision!r}: the hub did not say which commit this is; try again")
    files = {
        f.path: HubFile(f.path, f.size, f.blob_id, f.lfs.sha256 if f.lfs else None)
        for f in api.list_repo_tree(repo_id, recursive=True, revision=commit)
        if isinstance(f, RepoFile)
    }
    return HubListing(repo_id, revision, commit, files)


def write_listing(listing: HubListing, path: Path) -> None:
    """Save the listing (atomically) for a later offline run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**asdict(listing), "files": [asdict(f) for _, f in sorted(listing.files.items())]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_listing(path: Path, repo_id: str, revision: str) -> HubListing | None:
    """The saved listing if it is for `repo_id` at `revision` (a ref name or its commit), else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        listing = HubListing(
            data["repo_id"],
            data["requested_revision"],
            data["commit"],
            {f["path"]: HubFile(**f) for f in data["files"]},
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if listing.repo_id != repo_id or revision not in (listing.requested_revision, listing.commit):
        return None
    return listing


def select_files(listing: HubListing, allow_patterns: Sequence[str]) -> list[str]:
    """The files to fetch, sorted; refuses a listing without safetensors weights."""
    paths = sorted(listing.files)
    wanted = sorted(
        filter_repo_objects(paths, allow_patterns=list(allow_patterns), ignore_patterns=list(NEVER_FETCH))
    )
    if not any(p.endswith(".safetensors") for p in wanted):
        pickles = list(filter_repo_objects(paths, allow_patterns=list(PICKLE_PATTERNS)))
        where = f"{listing.repo_id} at {listing.requested_revision!r}, commit {listing.commit[:12]},"
        raise DownloadError(_pickles_only(where, pickles) if pickles else _no_weights(where))
    return wanted


# -- checking the files ------------------------------------------------------------------------


def remove_strays(snapshot: Path, wanted: Sequence[str]) -> None:
    """Delete files in `snapshot` that are not `wanted` (left by a download of another commit).

    A stale `model.safetensors` next to a sharded index would otherwise be loaded instead of it.
    `.cache/` (huggingface_hub's bookkeeping) is kept.
    """
    keep = set(wanted)
    for path in sorted(snapshot.rglob("*")):
        relative = path.relative_to(snapshot)
        if relative.parts[0] != ".cache" and path.is_file() and relative.as_posix() not in keep:
            log.info("removing %s: not part of this commit's selection", path)
            path.unlink()


def verify_files(snapshot: Path, listing: HubListing, wanted: Sequence[str]) -> list[dict]:
    """Check each wanted file's size and hash against the listing; return manifest entries.

    Every file that differs is deleted (so no later run trusts it) and named in the error.
    """
    entries, problems = [], []
    for path in wanted:
        expected, local = listing.files[path], snapshot / path
        if not local.is_file():  # snapshot_download returned without it: never seen, but cheap to say
            raise DownloadError(f"{local}: not downloaded ({listing.repo_id}); run the download again")
        problem, sha256 = _check_file(local, expected)
        if problem:
            local.unlink()
            problems.append(f"{local}: {problem}")
        else:
            entries.append({"path": path, "size": expected.size, "sha256": sha256})
    if problems:
        removed = "the file was removed" if len(problems) == 1 else "the files were removed"
        raise DownloadError(
            f"{'; '.join(problems)} ({listing.repo_id} at commit {listing.commit}); {removed}: run the "
            "download again to fetch afresh; if this repeats, a proxy or the hub's storage is serving "
            "a damaged copy"
        )
    return entries


def _check_file(local: Path, expected: HubFile) -> tuple[str | None, str]:
    """(what is wrong or None, the file's sha256)."""
    size = local.stat().st_size
    if size != expected.size:
        return f"{size} bytes, the hub lists {expected.size}", ""
    sha256 = hash_file(local)
    if expected.sha256 is not None and sha256 != expected.sha256:
        return f"sha256 {sha256} does not match the hub's {expected.sha256}", sha256
    if expected.sha256 is None:  # a plain git file: the hub gives its git blob id
        blob_id = git_hash(local.read_bytes())  # plain files are small (LFS takes the big ones)
        if blob_id != expected.git_sha1:
            return f"git blob id {blob_id} does not match the hub's {expected.git_sha1}", sha256
    return None, sha256


# -- one message per failure -------------------------------------------------------------------


def _explain(err: Exception, attempt: _Attempt) -> DownloadError:
    """The one `DownloadError` a user sees for a client error (never quoting the token)."""
    if isinstance(err, HFValidationError):
        return DownloadError(f"{attempt.repo_id!r} is not a valid repository id ({err}); use owner/name")
    if isinstance(err, GatedRepoError):
        return DownloadError(_gated(attempt, err.response.status_code))
    if isinstance(err, RepositoryNotFoundError):
        return DownloadError(
            f"repository {attempt.repo_id} not found on {attempt.endpoint}: check the name (owner/name, "
            "as on the model page); if it is private, set HF_TOKEN to a token that can read it"
        )
    if isinstance(err, RevisionNotFoundError):
        return DownloadError(
            f"revision {attempt.revision!r} not found in {attempt.repo_id}: give a branch, a tag or a full "
            f"40-character commit id that exists (see {attempt.endpoint}/{attempt.repo_id}/tree/main)"
        )
    if isinstance(err, RemoteEntryNotFoundError):
        return DownloadError(f"{attempt.at}: the hub lists a file it then cannot serve; try again later")
    if isinstance(err, HfHubHTTPError):
        return DownloadError(_http_status(attempt, err.response.status_code))
    if isinstance(err, (OfflineModeIsEnabled, LocalEntryNotFoundError)) and constants.is_offline_mode():
        return DownloadError(_offline_missing(attempt) if attempt.listing else _never_downloaded(attempt))
    if isinstance(err, (httpx2.TransportError, OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return DownloadError(_connection(attempt, err))
    if isinstance(err, OSError) and "Consistency check failed" in str(err):
        return DownloadError(_wrong_size(attempt, str(err)))
    return DownloadError(f"{attempt.at}: {type(err).__name__}: {err}")


def _gated(attempt: _Attempt, status: int) -> str:
    page = f"{attempt.endpoint}/{attempt.repo_id}"
    if status == 401:  # no token was sent
        return (
            f"{attempt.repo_id} is gated: accept its licence on {page} while logged in, create a read "
            f"token at {attempt.endpoint}/settings/tokens, and set it in the environment "
            "(export HF_TOKEN=hf_...) before running again"
        )
    return (
        f"{attempt.repo_id} is gated and the token given has no access to it: accept its licence on "
        f"{page} with the account that owns the token (approval may take a while), then run again"
    )


def _http_status(attempt: _Attempt, status: int) -> str:
    if status == 401:
        return (
            f"{attempt.endpoint} rejected the token given for {attempt.repo_id} (HTTP 401): it may be "
            f"revoked or mistyped; create a new one at {attempt.endpoint}/settings/tokens and set "
            "HF_TOKEN to it"
        )
    return f"{attempt.endpoint} answered HTTP {status} for {attempt.at}; the hub may be down, try again later"


def _connection(attempt: _Attempt, err: Exception) -> str:
    if attempt.listing is None:  # failed before anything was fetched
        return (
            f"cannot reach {attempt.endpoint} to look up {attempt.repo_id} ({type(err).__name__}: {err}): "
            "check the network and proxy settings; to work offline, set HF_HUB_OFFLINE=1 and "
            f"keep a complete earlier download in {attempt.out_dir}"
        )
    return (
        f"the connection dropped while downloading {attempt.at} and the client's retries ran out "
        f"({type(err).__name__}: {err}); still missing: {', '.join(attempt.missing()) or 'none'}. "
        "Run the download again: files already complete are kept and checked"
    )


def _wrong_size(attempt: _Attempt, message: str) -> str:
    sizes = re.search(r"should be of size (\d+) but has size (\d+)", message)
    if attempt.listing is None or sizes is None:
        return f"{attempt.at}: a file arrived with the wrong size ({message.splitlines()[0]}); run again"
    expected, actual = int(sizes[1]), int(sizes[2])
    suspects = [p for p in attempt.missing() if attempt.listing.files[p].size == expected]
    name = suspects[0] if len(suspects) == 1 else f"one of {', '.join(suspects) or 'the files'}"
    return (
        f"{name}: the server sent {actual} bytes, the hub lists {expected} ({attempt.at}); nothing "
        "was kept. Run the download again; if this repeats, a proxy or the hub's storage is "
        "truncating or padding the file"
    )


def _never_downloaded(attempt: _Attempt) -> str:
    return (
        f"offline mode is on (HF_HUB_OFFLINE=1) and {attempt.repo_id} at {attempt.revision!r} was never "
        f"downloaded to {attempt.out_dir}: run the download once with network access (unset "
        "HF_HUB_OFFLINE), or copy such a download there"
    )


def _offline_missing(attempt: _Attempt) -> str:
    missing = attempt.missing()
    return (
        f"offline mode is on (HF_HUB_OFFLINE=1) and {attempt.snapshot} lacks {len(missing)} file(s) of "
        f"{attempt.at}: {', '.join(missing)}. Run the download once with network access (unset "
        "HF_HUB_OFFLINE) to fetch them; the files already there are kept"
    )


def _pickles_only(where: str, pickles: list[str]) -> str:
    return (
        f"{where} has only pickle weights ({', '.join(pickles)}); remerge refuses them because loading "
        "a pickle can run arbitrary code. Pick a revision or repository with .safetensors weights (the "
        "hub's conversion bot often opens a pull request for them: --revision refs/pr/N), or convert "
        "the weights yourself in a sandbox and use the local folder"
    )


def _no_weights(where: str) -> str:
    return (
        f"{where} has no .safetensors weights in its top folder; pick a revision or repository that has them"
    )
