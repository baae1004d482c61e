"""Manifests of local folders: hashing, the exact format, atomic writing, validation, verification."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from remerge.cli import main
from remerge.errors import ModelError
from remerge.hub.manifest import hash_file, local_manifest, read_manifest, verify_manifest, write_manifest


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A model folder with a nested file and tool bookkeeping that is not part of the model."""
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (root / "config.json").write_text('{"hidden_size": 8}')
    (root / "sub" / "extra.json").write_text("{}")
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "x.metadata").write_text("bookkeeping")
    (root / ".gitattributes").write_text("*.safetensors filter=lfs")
    return root


def entry(root: Path, path: str) -> dict:
    data = (root / path).read_bytes()
    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_hash_file_is_sha256(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * (9 << 20))  # more than one read chunk
    assert hash_file(path) == hashlib.sha256(b"x" * (9 << 20)).hexdigest()


def test_local_manifest_lists_every_model_file_sorted_and_hashed_here(folder):
    assert local_manifest(folder) == {
        "format": "remerge.manifest/1",
        "source": "local",
        "repo_id": None,
        "requested_revision": None,
        "commit": None,
        "path": folder.as_posix(),
        "files": [
            entry(folder, "config.json"),
            entry(folder, "model.safetensors"),
            entry(folder, "sub/extra.json"),
        ],
    }


def test_write_then_read_round_trips_and_is_byte_identical(folder, tmp_path):
    manifest = local_manifest(folder)
    write_manifest(manifest, tmp_path / "a/manifest.json")
    write_manifest(local_manifest(folder), tmp_path / "b/manifest.json")

    assert read_manifest(tmp_path / "a/manifest.json") == manifest
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["manifest.json"]  # no temporary file left


def test_write_refuses_an_invalid_manifest_and_leaves_nothing(folder, tmp_path):
    manifest = local_manifest(folder)
    manifest["files"].reverse()
    with pytest.raises(ModelError, match="files are not sorted by path"):
        write_manifest(manifest, tmp_path / "out/manifest.json")
    assert not (tmp_path / "out/manifest.json").exists()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m: m.pop("commit"), "its keys are"),
        (lambda m: m.update(format="remerge.manifest/0"), "format is 'remerge.manifest/0'"),
        (
            lambda m: m.update(source="hub", repo_id="a/b", requested_revision="main", commit="abc"),
            "commit 'abc'",
        ),
        (lambda m: m["files"][0].update(sha256="F" * 64), "config.json: sha256 'FFFF"),
        (lambda m: m["files"][0].update(path="../config.json"), "is not relative to the folder"),
    ],
)
def test_read_manifest_names_the_file_and_the_problem(folder, tmp_path, change, problem):
    manifest = local_manifest(folder)
    change(manifest)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))

    with pytest.raises(ModelError) as err:
        read_manifest(path)
    assert str(err.value).startswith(f"{path}: not a valid remerge.manifest/1 manifest: ")
    assert problem in str(err.value)


def test_read_manifest_that_is_not_json(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ModelError, match=f"^{re.escape(str(path))}: cannot read the manifest"):
        read_manifest(path)


def test_verify_manifest_accepts_the_folder_it_describes(folder):
    verify_manifest(local_manifest(folder))


def test_verify_manifest_names_a_changed_file(folder):
    manifest = local_manifest(folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[100] ^= 1  # same size, one bit flipped
    (folder / "model.safetensors").write_bytes(bytes(data))

    with pytest.raises(ModelError) as err:
        verify_manifest(manifest)
    assert str(err.value) == (
        f"{folder}/model.safetensors: sha256 {hashlib.sha256(data).hexdigest()} differs from the "
        f"manifest's {manifest['files'][1]['sha256']}; the file changed after the manifest was written; "
        "download the model again, or rebuild the manifest with `remerge manifest` if the change is intended"
    )


def test_verify_manifest_names_a_missing_or_resized_file(folder):
    manifest = local_manifest(folder)
    (folder / "config.json").write_text("{}")
    with pytest.raises(
        ModelError, match=f"^{re.escape(str(folder))}/config.json: 2 bytes, the manifest records 18; "
    ):
        verify_manifest(manifest)
    (folder / "config.json").unlink()
    with pytest.raises(
        ModelError, match=f"^{re.escape(str(folder))}/config.json: listed in the manifest but missing; "
    ):
        verify_manifest(manifest)


def test_manifest_command_writes_inside_the_folder_without_listing_itself(folder, capsys):
    out = folder / "manifest.json"
    assert main(["manifest", str(folder), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{folder}: 3 files recorded in {out}\n"

    assert read_manifest(out) == local_manifest(folder, exclude=["manifest.json"])
    assert "manifest.json" not in [f["path"] for f in read_manifest(out)["files"]]


def test_manifest_command_reports_a_missing_folder(tmp_path, capsys):
    assert main(["manifest", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.json")]) == 2
    assert capsys.readouterr().err == (
        f"remerge manifest: error: {tmp_path}/nowhere: not a folder; "
        "give the folder that holds the model's files\n"
    )
