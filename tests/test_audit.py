"""Auditing a published merge against its recipe."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from remerge.provenance.audit import default_mapping, map_references, resolve_references
from remerge.provenance.compare import bytes_difference
from remerge.provenance.recovery import find_recipe, recipe_from_card
from remerge.cli import main
from tinymodels import finetune, random_tensors, write_model

# The seed model card as published (a copy of ../shared/reference/seed-model-card.txt, whose
# line breaks were lost on the way: recipe recovery must cope with that too).
SEED_CARD = Path(__file__).resolve().parent / "data" / "seed-model-card.txt"

RECIPE = """models:
  - model: {ft}
    parameters:
      weight: 1
      density: 1
  - model: {ft}
    parameters:
      weight: 1
      density: 1
merge_method: ties
base_model: {base}
parameters:
  density: 1
  normalize: true
  int8_mask: true
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A seed-shaped merge of tiny models, 'published' with a card holding the author's paths."""
    root = tmp_path_factory.mktemp("audit")
    base = random_tensors(0)
    write_model(root / "base", base)
    write_model(root / "ft", finetune(base, 1))
    (root / "ft" / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.6}))
    (root / "recipe.yml").write_text(RECIPE.format(ft=root / "ft", base=root / "base"))
    assert main(["merge", str(root / "recipe.yml"), str(root / "merged"), "--out-shard-size", "3K"]) == 0
    pub = root / "published"
    shutil.copytree(root / "merged", pub)
    (pub / "mergekit_config.yml").unlink()
    author = RECIPE.format(ft="/Users/someone/Workspace/org/ft", base="/Users/someone/Workspace/org/base")
    (pub / "README.md").write_text(f"---\nlicense: other\n---\n# x\n\n### Configuration\n\n```yaml\n{author}```\n")
    return root


def audit(root, pub, out, *extra):
    args = ["audit", str(pub), str(out), "--path-map", f"/Users/someone/Workspace/org/ft={root / 'ft'}",
            "--path-map", f"/Users/someone/Workspace/org/base={root / 'base'}", *extra]
    code = main(args)
    return code, json.loads((out / "audit.json").read_text()), (out / "audit.md").read_text()


def test_identical_copy_is_bit_identical(published, tmp_path):
    code, report, md = audit(published, published / "published", tmp_path / "a")
    assert code == 0 and report["verdict"] == "bit-identical"
    assert report["recipe"]["source"] == "README.md"
    assert report["mergekit_semantics"] == "0.0.5.1"  # recorded in the published index
    assert report["tensors"]["identical"] == report["tensors"]["compared"] > 0
    assert "**Verdict: bit-identical**" in md


def test_one_flipped_bit_is_found_and_named(published, tmp_path):
    pub = tmp_path / "pub"
    shutil.copytree(published / "published", pub)
    shard = sorted(pub.glob("model-*.safetensors"))[1]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    bits = tensors[name].view(torch.int16).clone()
    bits.view(-1)[3] ^= 1  # the lowest mantissa bit of one element
    tensors[name] = bits.view(torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    code, report, md = audit(published, pub, tmp_path / "a")
    assert code == 1 and report["verdict"] == "different tensors"
    [diff] = report["tensors"]["differing"]
    assert diff["name"] == name and diff["differing_elements"] == 1 and diff["max_ulp"] == 1
    assert name in md


def test_changed_generation_config_is_found_with_its_key(published, tmp_path):
    pub = tmp_path / "pub"
    shutil.copytree(published / "published", pub)
    for f in published.joinpath("ft").glob("*.json"):  # the seed's transplant
        shutil.copy(f, pub / f.name)
    code, report, _ = audit(published, pub, tmp_path / "a", "--transplant-from", "/Users/someone/Workspace/org/ft")
    assert code == 0 and report["verdict"] == "bit-identical"
    (pub / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.9}))
    code, report, md = audit(published, pub, tmp_path / "b", "--transplant-from", "/Users/someone/Workspace/org/ft")
    assert code == 0 and report["verdict"] == "same tensors, different config files"
    [entry] = report["files"]["differing"]
    assert entry["file"] == "generation_config.json"
    assert entry["keys"] == [{"key": "temperature", "expected": 0.6, "published": 0.9}]
    assert "generation_config.json" in md and "temperature" in md


def test_missing_tensor_is_found(published, tmp_path):
    pub = tmp_path / "pub"
    shutil.copytree(published / "published", pub)
    shard = sorted(pub.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    gone = sorted(tensors)[-1]
    del tensors[gone]
    save_file(tensors, shard, metadata={"format": "pt"})
    code, report, _ = audit(published, pub, tmp_path / "a")
    assert code == 1 and report["tensors"]["missing"] == [gone]


def test_recipe_from_the_seed_card():
    text = recipe_from_card(SEED_CARD.read_text())
    assert text is not None and "merge_method: ties" in text
    refs = ["/Users/jsarnecki/opt/Workspace/arcee-ai/Llama-3.1-SuperNova-Lite",
            "/Users/jsarnecki/opt/Workspace/meta-llama/Llama-3.1-8B"]
    assert all(r in text for r in refs)
    assert map_references(refs, {}) == {refs[0]: "arcee-ai/Llama-3.1-SuperNova-Lite",
                                         refs[1]: "meta-llama/Llama-3.1-8B"}
    assert default_mapping("org/name") == "org/name"


def test_recipe_from_mergekit_config(published):
    text, source = find_recipe(published / "merged")
    assert source == "mergekit_config.yml" and text == (published / "recipe.yml").read_text()


def test_ulp_distance_across_zero():
    a = torch.tensor([0.0, 1.0, -1.0], dtype=torch.bfloat16)
    b = torch.tensor([-0.0, 1.0078125, -1.0], dtype=torch.bfloat16)  # -0 differs in bytes only
    diff = bytes_difference(a.view(torch.int16).numpy().view("uint16"), b.view(torch.int16).numpy().view("uint16"), "BF16")
    assert diff["differing_elements"] == 2 and diff["max_ulp"] == 1


def test_path_map_prefixes_longest_match_and_windows_separators():
    refs = ["/Users/someone/Workspace/org/a", "/Users/someone/Workspace/org/sub/b",
            "/Users/someone/Workspace/org2/c", r"E:\models\org\d", "org/e"]
    path_map = {"/Users/someone/Workspace/org": "/data/models",
                "/Users/someone/Workspace/org/sub/": "/elsewhere",  # longer: wins for b
                "E:/models": "/mnt/e"}
    got = resolve_references(refs, path_map, exists=lambda r: False)
    assert {k: v["read"] for k, v in got.items()} == {
        refs[0]: "/data/models/a", refs[1]: "/elsewhere/b",
        refs[2]: "org2/c",  # whole path parts only: org2 is not under org
        refs[3]: "/mnt/e/org/d", "org/e": "org/e"}
    assert got[refs[1]]["how"] == "mapped by folder prefix /Users/someone/Workspace/org/sub/=/elsewhere"
    assert got[refs[2]]["how"].startswith("a local path")
    assert got["org/e"]["how"] == "a hub id"
    # an exact entry is a prefix of length "all" and beats any folder above it
    exact = resolve_references(refs[:1], {**path_map, refs[0]: "/x"}, exists=lambda r: False)
    assert exact[refs[0]] == {"read": "/x", "how": f"mapped {refs[0]}=/x"}


def test_one_prefix_map_resolves_three_models_and_the_report_shows_each(tmp_path):
    """Three references under one author folder, one `--path-map FOLDER=OURS`."""
    base = random_tensors(3)
    for i, name in enumerate(("base", "ft1", "ft2")):
        write_model(tmp_path / "ours" / name, base if i == 0 else finetune(base, 10 + i))
    author = "/Users/someone/Workspace/org"
    recipe = (f"models:\n  - model: {author}/ft1\n    parameters: {{weight: 0.6}}\n"
              f"  - model: {author}/ft2\n    parameters: {{weight: 0.4}}\n"
              f"merge_method: task_arithmetic\nbase_model: {author}/base\ndtype: bfloat16\n")
    (tmp_path / "ours.yml").write_text(recipe.replace(author, str(tmp_path / "ours")))
    assert main(["merge", str(tmp_path / "ours.yml"), str(tmp_path / "pub")]) == 0
    (tmp_path / "pub" / "mergekit_config.yml").write_text(recipe)
    out = tmp_path / "audit"
    assert main(["audit", str(tmp_path / "pub"), str(out), "--path-map",
                 f"{author}={tmp_path / 'ours'}"]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["verdict"] == "bit-identical"
    resolution = report["recipe"]["resolution"]
    assert {k: v["read"] for k, v in resolution.items()} == {
        f"{author}/{n}": f"{tmp_path / 'ours'}/{n}" for n in ("ft1", "ft2", "base")}
    md = (out / "audit.md").read_text()
    for n in ("ft1", "ft2", "base"):
        assert f"`{author}/{n}` -> `{tmp_path / 'ours'}/{n}` (mapped by folder prefix {author}=" in md


PARITY = Path(__file__).resolve().parent / "parity"


def audit_golden(recipe_name: str, tmp_path, recipe_text: str | None = None) -> tuple[int, dict, str]:
    """Audit a merge made by the real mergekit 0.1.5 with --random-seed 42 (remerge is not
    told the seed), its `./models/...` references mapped by one folder prefix."""
    args = ["audit", str(PARITY / "goldens" / "0.1.5" / recipe_name), str(tmp_path / "audit"),
            "--path-map", f"./models={PARITY / 'models'}"]
    if recipe_text is not None:
        (tmp_path / "card.yml").write_text(recipe_text)
        args += ["--recipe", str(tmp_path / "card.yml")]
    code = main(args)
    return code, json.loads((tmp_path / "audit" / "audit.json").read_text()), \
        (tmp_path / "audit" / "audit.md").read_text()


def test_a_seeded_dare_ties_merge_audits_as_consistent_element_by_element(tmp_path):
    code, report, md = audit_golden("dare_ties_seed_bf16", tmp_path)
    assert code == 0
    assert report["verdict"] == "consistent with the recipe (random method, checked element by element)"
    assert "element by element" in report["basis"]
    assert report["elementwise"]["tensors"] > 0 and not report["elementwise"]["problems"]
    assert not report["tensors"]["extra"] and not report["tensors"]["missing"]
    assert "## Random draws, element by element" in md


def test_a_card_stating_the_wrong_density_audits_as_inconsistent(tmp_path):
    recipe = (PARITY / "recipes" / "dare_ties_seed_bf16.yml").read_text().replace("density: 0.5", "density: 0.9")
    code, report, md = audit_golden("dare_ties_seed_bf16", tmp_path, recipe)
    assert code == 1 and report["verdict"] == "inconsistent"
    problems = report["elementwise"]["problems"]
    assert any(p.startswith("tensor model.") and "kept" in p and "density 0.9" in p for p in problems)
    assert "Problems:" in md
