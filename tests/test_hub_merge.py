"""Recipes that name hub ids: `remerge merge` and `remerge audit` download (pinned, verified)
through the real huggingface_hub client from a local fake hub."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hubserver import FakeHub
from tinymodels import finetune, random_tensors, write_model

RECIPE = """models:
  - model: {ft}
    parameters: {{weight: 0.7, density: 0.5}}
merge_method: ties
base_model: {base}
parameters: {{normalize: true, int8_mask: true}}
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubmerge")
    base = random_tensors(0)
    write_model(root / "base", base, shards=2)
    write_model(root / "ft", finetune(base, 1))
    with FakeHub() as fake:
        fake.add_repo("org/base", root / "base")
        fake.add_repo("org/ft", root / "ft", tags=["v1"])
        yield fake, root


def remerge(hub, root, *args):
    env = hub.client_env(root / "hf-home")
    return subprocess.run([sys.executable, "-m", "remerge", *args], capture_output=True, text=True,
                          env=env, cwd=root, timeout=300)


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= {k: v.view(-1).view(__import__("torch").uint8) for k, v in load_file(f).items()}
    return out


def test_merge_from_hub_ids_equals_the_local_merge(hub):
    fake, root = hub
    (root / "hub.yml").write_text(RECIPE.format(ft="org/ft@v1", base="org/base"))
    (root / "local.yml").write_text(RECIPE.format(ft=root / "ft", base=root / "base"))
    proc = remerge(fake, root, "merge", "hub.yml", "out_hub", "--models-dir", "models")
    assert proc.returncode == 0, proc.stderr
    assert remerge(fake, root, "merge", "local.yml", "out_local").returncode == 0
    ours, local = tensors(root / "out_hub"), tensors(root / "out_local")
    assert ours.keys() == local.keys() and all((ours[k] == local[k]).all() for k in ours)
    manifest = json.loads((root / "models" / "org--ft" / "v1" / "manifest.json").read_text())
    assert manifest["repo_id"] == "org/ft" and manifest["requested_revision"] == "v1"
    assert len(manifest["commit"]) == 40
    card = (root / "out_hub" / "README.md").read_text()
    assert "base_model:\n- org/ft\n- org/base\n" in card  # repo ids, without the revision


def test_audit_of_a_hub_published_merge_with_the_authors_paths(hub):
    fake, root = hub
    (root / "r.yml").write_text(RECIPE.format(ft="org/ft", base="org/base"))
    assert remerge(fake, root, "merge", "r.yml", "published", "--models-dir", "models").returncode == 0
    pub = root / "published"
    (pub / "mergekit_config.yml").unlink()  # only the card's YAML block, with the author's paths
    author = RECIPE.format(ft="/home/author/models/org/ft", base="/home/author/models/org/base")
    (pub / "README.md").write_text(f"# merged\n\n```yaml\n{author}```\n")
    fake.add_repo("someone/merged", pub)
    proc = remerge(fake, root, "audit", "someone/merged", "audit", "--models-dir", "models")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((root / "audit" / "audit.json").read_text())
    assert report["verdict"] == "bit-identical"
    assert report["recipe"]["references"] == {"/home/author/models/org/ft": "org/ft",
                                              "/home/author/models/org/base": "org/base"}
    # one changed byte in the published weights: the audit names the tensor, exits 1
    bad = root / "bad"
    shutil.copytree(pub, bad)
    shard = next(bad.glob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01
    shard.write_bytes(bytes(raw))
    fake.add_repo("someone/bad", bad)
    proc = remerge(fake, root, "audit", "someone/bad", "audit_bad", "--models-dir", "models")
    assert proc.returncode == 1
    assert json.loads((root / "audit_bad" / "audit.json").read_text())["verdict"] == "different tensors"
