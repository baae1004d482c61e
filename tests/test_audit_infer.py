"""`remerge audit --infer`: recipes recovered from the weights of merges made by the real
mergekit 0.1.5 (the parity goldens), published without their recipe, then re-merged."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from remerge.cli import main
from remerge.provenance.infer import density_candidates, scale_free_forms, slices_of

PARITY = Path(__file__).resolve().parent / "parity"
MODELS = PARITY / "models"
CANDIDATES = [str(MODELS / m) for m in ("base", "ft_a", "ft_b", "ft_c")]


def published_without_recipe(golden: str, tmp_path: Path) -> Path:
    pub = tmp_path / "published"
    shutil.copytree(PARITY / "goldens" / "0.1.5" / golden, pub)
    (pub / "mergekit_config.yml").unlink()
    (pub / "README.md").write_text("# a merge\n\nNo recipe here.\n")
    return pub


def infer(pub: Path, out: Path, *extra: str) -> tuple[int, dict]:
    args = ["audit", str(pub), str(out), "--infer", *[a for c in CANDIDATES for a in ("--candidate", c)], *extra]
    code = main(args)
    return code, json.loads((out / "audit.json").read_text())


def inferred(report: dict) -> dict:
    return yaml.safe_load(report["inference"]["best"]["recipe"])


def weights_of(recipe: dict) -> dict:
    return {Path(e["model"]).name: e["parameters"] for e in recipe["models"]}


def test_linear_merge_is_recovered_and_re_merged_bit_identically(tmp_path):
    code, report = infer(published_without_recipe("linear_bf16_normalize", tmp_path), tmp_path / "a")
    assert code == 0
    assert report["tensors"]["identical"] == report["tensors"]["compared"] > 0
    assert not report["tensors"]["differing"]
    recipe = inferred(report)
    assert recipe["merge_method"] == "linear"
    # the golden's recipe: 0.3 / 0.7 / 0.1, normalized (found up to the common factor)
    assert {m: p["weight"] for m, p in weights_of(recipe).items()} == {"base": 0.3, "ft_a": 0.7, "ft_b": 0.1}
    assert report["basis"].startswith("an inferred recipe")
    assert report["recipe"]["source"] == "inferred from the weights (--infer)"
    md = (tmp_path / "a" / "audit.md").read_text()
    assert "## Inferred recipe" in md and "merge_method: linear" in md


def test_ties_merge_is_recovered_with_its_densities_and_weights(tmp_path):
    code, report = infer(published_without_recipe("ties_d05_two_models", tmp_path), tmp_path / "a")
    assert code == 0 and not report["tensors"]["differing"]
    recipe = inferred(report)
    assert recipe["merge_method"] == "ties" and Path(recipe["base_model"]).name == "base"
    params = weights_of(recipe)
    assert {m: p["density"] for m, p in params.items()} == {"ft_a": 0.5, "ft_b": 0.3}
    assert params["ft_a"]["weight"] / params["ft_b"]["weight"] == pytest.approx(0.7 / 0.3)


def test_task_arithmetic_weights_are_recovered(tmp_path):
    code, report = infer(published_without_recipe("task_arithmetic_plain", tmp_path), tmp_path / "a",
                         "--base", str(MODELS / "base"))
    assert code == 0 and not report["tensors"]["differing"]
    recipe = inferred(report)
    assert recipe["merge_method"] == "task_arithmetic"
    assert {m: p["weight"] for m, p in weights_of(recipe).items()} == {"ft_a": 0.7, "ft_b": 0.3}


def test_a_model_that_is_no_merge_of_the_candidates_gets_the_closest_estimate(tmp_path):
    # slerp with per-filter gradients of t: beyond what --infer estimates today
    pub = published_without_recipe("slerp_filters", tmp_path)
    code, report = infer(pub, tmp_path / "a")
    assert code == 1 and report["verdict"] == "different tensors"
    assert report["inference"]["estimates_tried"] > 1
    assert "no estimate reproduced every tensor" in (tmp_path / "a" / "audit.md").read_text()


def test_without_a_recipe_or_candidates_the_error_points_to_infer(tmp_path, capsys):
    pub = published_without_recipe("linear_bf16_normalize", tmp_path)
    assert main(["audit", str(pub), str(tmp_path / "a")]) == 2
    assert "--infer --candidate MODEL" in capsys.readouterr().err


def test_rounded_forms_and_density_candidates():
    # up to a common factor: 0.2730/0.6362/0.0907 are 0.3/0.7/0.1 scaled by 1/1.1
    assert scale_free_forms([0.2730, 0.6362, 0.0907])[0] == (0.3, 0.7, 0.1)
    assert density_candidates(0.4979, 0.5052)[0] == 0.5
    assert density_candidates(0.7, 1.01)[0] == 1.0  # nothing dropped: density 1 first
    assert slices_of([("a", 0), ("a", 1), ("b", 1), ("b", 2), ("a", 1)]) == [("a", 0, 2), ("b", 1, 3), ("a", 1, 2)]


def test_slerp_t_is_recovered_from_the_angle(tmp_path):
    code, report = infer(published_without_recipe("slerp_bf16_multishard", tmp_path), tmp_path / "a")
    assert code == 0 and not report["tensors"]["differing"]
    recipe = inferred(report)
    assert recipe["merge_method"] == "slerp" and recipe["parameters"] == {"t": 0.3}
    assert Path(recipe["base_model"]).name == "base"
    assert [Path(m["model"]).name for m in recipe["models"]] == ["ft_a"]


def test_frankenmerge_layers_are_found_by_digest_and_re_merged(tmp_path):
    """12 output layers from two 3-layer models, repeated and reordered (mergekit's output)."""
    code, report = infer(published_without_recipe("slices_passthrough_deep_3k", tmp_path), tmp_path / "a")
    assert code == 0 and not report["tensors"]["differing"]
    recipe = inferred(report)
    assert recipe["merge_method"] == "passthrough"
    original = yaml.safe_load((PARITY / "recipes" / "slices_passthrough_deep_3k.yml").read_text())
    def ranges(r):
        return [(Path(s["sources"][0]["model"]).name, s["sources"][0]["layer_range"]) for s in r["slices"]]
    assert ranges(recipe) == ranges(original)
    assert "Output layers come from" in (tmp_path / "a" / "audit.md").read_text()
