"""`remerge download` with the real huggingface_hub client against the fake hub in hubserver.py.

Each download runs `python -m remerge download` in a subprocess: huggingface_hub reads
HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME when it is imported, so the environment has to be set
before the import, and the subprocess shows exactly what a user sees. The environment points
the client at 127.0.0.1 only (checked in `download`).
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hubserver import FakeHub

REPO = "acme/tiny-llm"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """The error line the command prints (without its `remerge download: error: ` prefix)."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("remerge download: error: ")]
        assert len(lines) == 1, self.stderr
        return lines[0].removeprefix("remerge download: error: ")


def write_model(folder: Path, seed: int = 0, sharded: bool = True) -> Path:
    """A tiny model folder: safetensors weights (two shards + index, or one file), configs, tokenizer."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tensors = {
        "embed.weight": rng.standard_normal((16, 8), dtype=np.float32),
        "norm.weight": np.ones(8, np.float32),
    }
    if sharded:
        save_file({"embed.weight": tensors["embed.weight"]}, str(folder / SHARD1))
        save_file({"norm.weight": tensors["norm.weight"]}, str(folder / SHARD2))
        index = {"metadata": {}, "weight_map": {"embed.weight": SHARD1, "norm.weight": SHARD2}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "seed": seed}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    return folder


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_files(folder: Path) -> list[dict]:
    return [
        {"path": p.name, "size": p.stat().st_size, "sha256": sha256(p.read_bytes())}
        for p in sorted(folder.iterdir())
        if p.is_file()
    ]


@pytest.fixture
def hub():
    with FakeHub() as hub:
        yield hub


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "src")


def download(
    hub: FakeHub, tmp_path: Path, *args: str, offline: bool = False, env: dict | None = None
) -> Result:
    """Run `remerge download` in `tmp_path` against `hub` (HF_HOME is tmp_path/hf-home)."""
    client_env = hub.client_env(tmp_path / "hf-home", offline=offline)
    assert client_env["HF_ENDPOINT"].startswith("http://127.0.0.1:")  # no test reaches the internet
    proc = subprocess.run(
        [sys.executable, "-m", "remerge", "download", *args],
        cwd=tmp_path,
        env={**client_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def resolve_revisions(hub: FakeHub) -> set[str]:
    """The revisions named in file requests (`/{repo}/resolve/{rev}/{file}`)."""
    return {r.path.split("/resolve/")[1].split("/")[0] for r in hub.requests if "/resolve/" in r.path}


# -- success -----------------------------------------------------------------------------------


def test_pinned_commit_downloads_that_commit(hub, tmp_path, model):
    first = hub.add_repo(REPO, model)
    hub.add_commit(REPO, write_model(tmp_path / "v2", seed=1))  # main moves on

    result = download(hub, tmp_path, REPO, "--revision", first, "--out", "out")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{REPO} {first}: 6 files verified in out/snapshot\n"
    assert read_manifest(tmp_path / "out") == {
        "format": "remerge.manifest/1",
        "source": "hub",
        "repo_id": REPO,
        "requested_revision": first,
        "commit": first,
        "path": "out/snapshot",
        "files": expected_files(model),
    }
    for f in expected_files(model):
        assert (tmp_path / "out/snapshot" / f["path"]).read_bytes() == (model / f["path"]).read_bytes()
    assert resolve_revisions(hub) == {first}


def test_branch_is_resolved_recorded_and_followed(hub, tmp_path):
    old = hub.add_repo(REPO, write_model(tmp_path / "v1", sharded=False), tags=["v1.0"])
    assert download(hub, tmp_path, REPO, "--revision", "v1.0", "--out", "out").returncode == 0
    assert read_manifest(tmp_path / "out")["requested_revision"] == "v1.0"
    assert read_manifest(tmp_path / "out")["commit"] == old

    new_folder = write_model(tmp_path / "v2", seed=1)  # sharded now, new weights and config
    new = hub.add_commit(REPO, new_folder)
    hub.requests.clear()
    result = download(hub, tmp_path, REPO, "--out", "out")  # main, the default

    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "out")
    assert (manifest["requested_revision"], manifest["commit"]) == ("main", new)
    assert manifest["files"] == expected_files(new_folder)
    # Files are fetched at the commit, not at the branch that could move meanwhile.
    assert resolve_revisions(hub) == {new}
    # Unchanged files are kept; the old single-file weights would shadow the shards: removed.
    assert "tokenizer.json" not in hub.fetched(REPO) and "tokenizer_config.json" not in hub.fetched(REPO)
    assert not (tmp_path / "out/snapshot/model.safetensors").exists()
    # Determinism: the same download again writes the same bytes.
    before = (tmp_path / "out/manifest.json").read_bytes()
    assert download(hub, tmp_path, REPO, "--out", "out").returncode == 0
    assert (tmp_path / "out/manifest.json").read_bytes() == before


def test_only_safetensors_configs_and_tokenizer_are_fetched(hub, tmp_path, model):
    (model / "pytorch_model.bin").write_bytes(b"pickle, never fetched")
    (model / "training_args.bin").write_bytes(b"pickle")
    (model / "model.gguf").write_bytes(b"gguf")
    (model / "modeling_tiny.py").write_text("import os  # remote code")
    (model / "README.md").write_text("# tiny")
    (model / "tokenizer.model").write_bytes(b"sentencepiece")
    (model / "original").mkdir()
    (model / "original/consolidated.00.pth").write_bytes(b"pickle")
    (model / "original/params.json").write_text("{}")
    hub.add_repo(REPO, model)

    result = download(hub, tmp_path, REPO, "--out", "out")

    assert result.returncode == 0, result.stderr
    wanted = [SHARD1, SHARD2, "config.json", "model.safetensors.index.json", "tokenizer.json"]
    wanted += ["tokenizer.model", "tokenizer_config.json"]
    assert hub.fetched(REPO) == sorted(wanted)
    assert [f["path"] for f in read_manifest(tmp_path / "out")["files"]] == sorted(wanted)


def test_connection_dropped_once_is_resumed(hub, tmp_path, model):
    hub.add_repo(REPO, model)
    hub.drop_connection(REPO, SHARD1, after=100, times=1)

    result = download(hub, tmp_path, REPO, "--out", "out")

    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "out")["files"] == expected_files(model)
    shard_gets = [r for r in hub.requests if r.method == "GET" and r.file == SHARD1]
    assert len(shard_gets) == 2


def test_offline_run_verifies_a_complete_download_without_the_hub(hub, tmp_path, model):
    commit = hub.add_repo(REPO, model)
    assert download(hub, tmp_path, REPO, "--out", "out").returncode == 0
    (tmp_path / "out/manifest.json").unlink()  # e.g. Snakemake reruns the job on a node without network
    hub.requests.clear()

    result = download(hub, tmp_path, REPO, "--out", "out", offline=True)

    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "out")["commit"] == commit
    assert hub.requests == []


# -- failures: one message each, no manifest, nothing left to trust ----------------------------


def test_corrupted_file_of_the_right_size_is_removed_and_named(hub, tmp_path, model):
    commit = hub.add_repo(REPO, model)
    hub.corrupt_file(REPO, SHARD2)
    good = (model / SHARD2).read_bytes()
    middle = len(good) // 2
    bad = good[:middle] + bytes([good[middle] ^ 0xFF]) + good[middle + 1 :]

    result = download(hub, tmp_path, REPO, "--out", "out")

    assert result.returncode == 2
    assert result.error == (
        f"out/snapshot/{SHARD2}: sha256 {sha256(bad)} does not match the hub's {sha256(good)} "
        f"({REPO} at commit {commit}); the file was removed: run the download again to fetch "
        "afresh; if this repeats, a proxy or the hub's storage is serving a damaged copy"
    )
    assert not (tmp_path / "out/snapshot" / SHARD2).exists()
    assert not (tmp_path / "out/manifest.json").exists()

    hub.clear_faults()  # the next run fetches the removed file again and succeeds
    assert download(hub, tmp_path, REPO, "--out", "out").returncode == 0
    assert read_manifest(tmp_path / "out")["files"] == expected_files(model)


def test_corrupted_plain_git_file_is_caught_by_its_blob_id(hub, tmp_path, model):
    hub.add_repo(REPO, model)
    hub.corrupt_file(REPO, "config.json")

    result = download(hub, tmp_path, REPO, "--out", "out")

    assert result.returncode == 2
    assert result.error.startswith("out/snapshot/config.json: git blob id ")
    assert not (tmp_path / "out/snapshot/config.json").exists()
    assert not (tmp_path / "out/manifest.json").exists()


def test_wrong_size_is_named_and_nothing_kept(hub, tmp_path, model):
    commit = hub.add_repo(REPO, model)
    hub.resize_file(REPO, SHARD1, delta=-7)
    size = (model / SHARD1).stat().st_size

    result = download(hub, tmp_path, REPO, "--out", "out")

    assert result.returncode == 2
    assert result.error == (
        f"{SHARD1}: the server sent {size - 7} bytes, the hub lists {size} ({REPO} at 'main', "
        f"commit {commit[:12]}); nothing was kept. Run the download again; if this repeats, a proxy "
        "or the hub's storage is truncating or padding the file"
    )
    assert not (tmp_path / "out/snapshot" / SHARD1).exists()
    assert not (tmp_path / "out/manifest.json").exists()


def test_connection_that_keeps_dropping_fails_clearly(hub, tmp_path, model):
    commit = hub.add_repo(REPO, model)
    hub.drop_connection(REPO, SHARD1, after=0, times=None)
    size = (model / SHARD1).stat().st_size

    result = download(hub, tmp_path, REPO, "--out", "out")

    assert result.returncode == 2
    assert result.error == (
        f"the connection dropped while downloading {REPO} at 'main', commit {commit[:12]} and the "
        "client's retries ran out (RemoteProtocolError: peer closed connection without sending "
        f"complete message body (received 0 bytes, expected {size})); still missing: {SHARD1}. "
        "Run the download again: files already complete are kept and checked"
    )
    assert not (tmp_path / "out/snapshot" / SHARD1).exists()
    assert not (tmp_path / "out/manifest.json").exists()


def test_unreachable_hub(hub, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"

    result = download(hub, tmp_path, REPO, "--out", "out", env={"HF_ENDPOINT": endpoint})

    assert result.returncode == 2
    assert result.error.startswith(f"cannot reach {endpoint} to look up {REPO} (ConnectError: ")
    assert result.error.endswith(
        "check the network and proxy settings; to work offline, set HF_HUB_OFFLINE=1 and keep a "
        "complete earlier download in out"
    )


def test_unknown_repository(hub, tmp_path):
    result = download(hub, tmp_path, "acme/no-such-model", "--out", "out")

    assert result.returncode == 2
    assert result.error == (
        f"repository acme/no-such-model not found on {hub.endpoint}: check the name (owner/name, as on "
        "the model page); if it is private, set HF_TOKEN to a token that can read it"
    )
    assert not (tmp_path / "out/manifest.json").exists()


def test_unknown_revision(hub, tmp_path, model):
    hub.add_repo(REPO, model)

    result = download(hub, tmp_path, REPO, "--revision", "v9", "--out", "out")

    assert result.returncode == 2
    assert result.error == (
        f"revision 'v9' not found in {REPO}: give a branch, a tag or a full 40-character commit id "
        f"that exists (see {hub.endpoint}/{REPO}/tree/main)"
    )


def test_gated_repository_without_token_says_how_to_set_hf_token(hub, tmp_path, model):
    hub.add_repo(REPO, model, gated=True, tokens=["hf_granted"])

    result = download(hub, tmp_path, REPO, "--out", "out")

    assert result.returncode == 2
    assert result.error == (
        f"{REPO} is gated: accept its licence on {hub.endpoint}/{REPO} while logged in, create a read "
        f"token at {hub.endpoint}/settings/tokens, and set it in the environment "
        "(export HF_TOKEN=hf_...) before running again"
    )
    assert not (tmp_path / "out/manifest.json").exists()


def test_gated_repository_token_is_used_but_never_shown_or_stored(hub, tmp_path, model):
    hub.add_repo(REPO, model, gated=True, tokens=["hf_granted_SECRET"])

    refused = download(hub, tmp_path, REPO, "--out", "out", env={"HF_TOKEN": "hf_refused_SECRET"})
    assert refused.returncode == 2
    assert refused.error == (
        f"{REPO} is gated and the token given has no access to it: accept its licence on "
        f"{hub.endpoint}/{REPO} with the account that owns the token (approval may take a while), "
        "then run again"
    )
    granted = download(
        hub, tmp_path, REPO, "--out", "out", "--token-env", "MY_TOKEN", env={"MY_TOKEN": "hf_granted_SECRET"}
    )
    assert granted.returncode == 0, granted.stderr

    for text in (refused.stdout, refused.stderr, granted.stdout, granted.stderr):
        assert "SECRET" not in text
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.parent != tmp_path / "src":
            assert b"SECRET" not in path.read_bytes(), path
    # The token goes to the hub, never to the storage host the LFS files are redirected to.
    assert all(r.authorized for r in hub.requests if "/resolve/" in r.path)
    assert not any(r.authorized for r in hub.requests if r.path.startswith("/lfs/"))


def test_unset_token_variable_is_reported(hub, tmp_path):
    result = download(hub, tmp_path, REPO, "--out", "out", "--token-env", "MY_TOKEN")

    assert result.returncode == 2
    assert result.error == "--token-env MY_TOKEN: that environment variable is not set; export it"
    assert hub.requests == []


def test_offline_without_an_earlier_download(hub, tmp_path, model):
    hub.add_repo(REPO, model)

    result = download(hub, tmp_path, REPO, "--out", "out", offline=True)

    assert result.returncode == 2
    assert result.error == (
        f"offline mode is on (HF_HUB_OFFLINE=1) and {REPO} at 'main' was never downloaded to out: run "
        "the download once with network access (unset HF_HUB_OFFLINE), or copy such a download there"
    )
    assert hub.requests == []


def test_offline_with_a_download_lacking_files(hub, tmp_path, model):
    commit = hub.add_repo(REPO, model)
    assert download(hub, tmp_path, REPO, "--out", "out").returncode == 0
    (tmp_path / "out/manifest.json").unlink()
    (tmp_path / "out/snapshot" / SHARD2).unlink()  # as an interrupted download leaves it
    hub.requests.clear()

    result = download(hub, tmp_path, REPO, "--out", "out", offline=True)

    assert result.returncode == 2
    assert result.error == (
        f"offline mode is on (HF_HUB_OFFLINE=1) and out/snapshot lacks 1 file(s) of {REPO} at 'main', "
        f"commit {commit[:12]}: {SHARD2}. Run the download once with network access (unset "
        "HF_HUB_OFFLINE) to fetch them; the files already there are kept"
    )
    assert hub.requests == []
    assert not (tmp_path / "out/manifest.json").exists()


def test_repository_with_only_pickle_weights_is_refused(hub, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    commit = hub.add_repo(REPO, folder)

    result = download(hub, tmp_path, REPO, "--out", "out")

    assert result.returncode == 2
    assert result.error == (
        f"{REPO} at 'main', commit {commit[:12]}, has only pickle weights (pytorch_model.bin); remerge "
        "refuses them because loading a pickle can run arbitrary code. Pick a revision or repository "
        "with .safetensors weights (the hub's conversion bot often opens a pull request for them: "
        "--revision refs/pr/N), or convert the weights yourself in a sandbox and use the local folder"
    )
    assert hub.fetched() == []
    assert not (tmp_path / "out/manifest.json").exists()
