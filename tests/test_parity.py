"""Parity with the real mergekit: our merge of each recipe equals mergekit's output byte for byte.

Goldens in tests/parity/goldens/<version>/<recipe>/ were written by every mergekit release with
a verified record that PyPI has (0.0.5, 0.0.5.1, 0.0.6, 0.1.4, 0.1.5; tests/parity/make_goldens.py
regenerates them; CI never runs mergekit). Each recipe is merged here following the same
version's semantics, from tests/parity/ as mergekit ran.
"""

import json
from pathlib import Path

import pytest

from remerge.cli import main
from remerge.merge.releases import RELEASES

PARITY = Path(__file__).resolve().parent / "parity"
GOLDENS = PARITY / "goldens"
# every release with a record and goldens (a verified record must have them: tested below)
VERSIONS = tuple(v for v in RELEASES if (GOLDENS / v).is_dir())
# as make_goldens.py ran them
SEEDED = ("della_seed_bf16", "della_seed_fp16", "della_linear_seed_fp32", "dare_ties_seed_bf16")
OPTIONS = {"ties_multishard_2k": ["--out-shard-size", "2K"],
           "slices_passthrough_frankenmerge_2k": ["--out-shard-size", "2K"],
           "slices_passthrough_deep_3k": ["--out-shard-size", "3K"],
           **{recipe: ["--random-seed", "42"] for recipe in SEEDED}}
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

# Where remerge refuses what a mergekit version did: (recipe, version) -> why, message we give.
# Keyed by the release's field, not its version: every release that behaves so diverges so.
DIVERGENCES = {
    **{("error_shape_mismatch", v): (
        f"mergekit {v} silently leaves a model with a mismatched shape out of that tensor; "
        "remerge refuses rather than change the result quietly", "merging needs identical shapes")
       for v in VERSIONS if RELEASES[v].shape_mismatch == "skip"},
    **{("error_slices_backwards_range", v): (
        "mergekit stacks no layer for layer_range [2, 1] but counts -1 layers in config.json's "
        "num_hidden_layers", "layers run from start") for v in VERSIONS},
    **{("error_slices_duplicate_in_slice", v): (
        f"mergekit {v} keeps one of a model listed twice in a slice (its gather is a dict "
        "keyed by model); remerge refuses, as 0.1.5 does", "is listed twice; list each model once")
       for v in VERSIONS if RELEASES[v].duplicate_inputs == "count_once"},
}
# What mergekit refused and the message remerge gives instead.
REFUSALS = {
    "error_missing_tensor": "is missing from model ./models/ft_missing",
    "error_shape_mismatch": "merging needs identical shapes",
    "seed_ties_duplicate_model": "0.1.5 refuses such a recipe",
    "ties_tied_base_lacks_lm_head": "tensor lm_head.weight is missing from model ./models/base_tied",
    "error_arcee_fusion_three_models": "merge_method arcee_fusion takes exactly 2 inputs",
    "error_della_epsilon": "density 0.9 +/- epsilon 0.15 must lie in (0, 1)",
    "error_della_linear_epsilon_low": "+/- epsilon 0.1 must lie in (0, 1)",
    "error_model_stock_no_base": "merge_method model_stock needs `base_model`",
    "error_model_stock_two_inputs": "merge_method model_stock takes at least 3 inputs",
    "error_multislerp_zero_sum": "the weighted sum of the multislerp inputs is zero",
    "error_nearswap_missing_t": "missing `t` for tensor",
    "error_nuslerp_one_model": "merge_method nuslerp takes at least 2 non-base inputs",
    "error_passthrough_base_appended": "merge_method passthrough takes exactly 1 inputs",
    "error_passthrough_two_models": "merge_method passthrough takes exactly 1 inputs",
    "error_ram_no_base": "merge_method ram needs `base_model`",
    "error_sce_no_base": "merge_method sce needs `base_model`",
    "error_slerp_missing_t": "missing `t` for tensor",
    "error_slerp_no_base": "merge_method slerp needs `base_model`",
    "error_slerp_three_models": "merge_method slerp takes exactly 2 inputs",
    "error_slices_length_mismatch": "its sources cover different numbers of layers (./models/ft_a [0, 3]: 3, ./models/ft_b [0, 2]: 2)",
    "error_slices_layer_range_beyond": "model ./models/ft_b has 3 layers (0 to 2); end may be at most 3",
    "error_slices_and_models": "`models` and `slices` together",
    "error_slices_duplicate_in_slice": "model ./models/ft_a is listed twice; list each model once",
    "error_slices_base_not_in_slice": "base_model ./models/base is not among the sources of the slice",
    "error_slices_qwen2_layer_types": "with num_hidden_layers 4 the config is invalid for transformers",
    "slices_ties_post_drops_base": "base_model ./models/base is not among the sources of the tensors after the layers",
}
UNKNOWN_TO_RELEASE = "remerge does not know mergekit"  # a method the followed release lacks
MULTI = "multi_"  # multi-stage recipes (mergekit-multi 0.1.5 only): tests/test_multistage.py

CASES = sorted(
    (recipe.name, version)
    for version in VERSIONS
    for recipe in (GOLDENS / version).iterdir()
    if recipe.is_dir() and not recipe.name.startswith(MULTI)
)


def test_every_recipe_has_goldens_of_every_version():
    recipes = sorted(p.stem for p in (PARITY / "recipes").glob("*.yml") if not p.stem.startswith(MULTI))
    assert len(recipes) >= 100
    for version in VERSIONS:
        assert sorted(p.name for p in (GOLDENS / version).iterdir() if not p.name.startswith(MULTI)) == recipes


def test_goldens_are_those_of_the_verified_records():
    """A verified record was checked against its release's goldens, and goldens belong to a
    release remerge has a record of."""
    assert sorted(p.name for p in GOLDENS.iterdir()) == sorted(VERSIONS)
    assert sorted(VERSIONS) == sorted(v for v, r in RELEASES.items() if r.verified)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Merge every case once (from tests/parity, as mergekit ran); {case: (exit code, stderr, out)}."""
    import contextlib
    import io
    import os

    root = tmp_path_factory.mktemp("parity")
    results = {}
    cwd = os.getcwd()
    os.chdir(PARITY)
    try:
        for recipe, version in CASES:
            out = root / version / recipe  # the folder name is the card's title, as in mergekit
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(["merge", f"recipes/{recipe}.yml", str(out), "--mergekit-version", version,
                             *OPTIONS.get(recipe, [])])
            results[(recipe, version)] = (code, err.getvalue(), out)
    finally:
        os.chdir(cwd)
    return results


def recipe_data(recipe: str) -> dict:
    import yaml

    return yaml.safe_load((PARITY / "recipes" / f"{recipe}.yml").read_text())


def base_less(recipe: str) -> bool:
    return not recipe_data(recipe).get("base_model")


def unknown_to(recipe: str, version: str) -> bool:
    """A method whose arithmetic in this release remerge does not follow (it refuses)."""
    from remerge.merge.releases import RELEASES

    return recipe_data(recipe).get("merge_method") not in RELEASES[version].methods


@pytest.mark.parametrize("recipe, version", CASES, ids=[f"{v}-{r}" for r, v in CASES])
def test_parity(merged, recipe, version):
    code, err, out = merged[(recipe, version)]
    golden = GOLDENS / version / recipe
    if unknown_to(recipe, version):
        assert code == 2 and UNKNOWN_TO_RELEASE in err, err
        return
    if (golden / "REFUSED.txt").exists() or (recipe, version) in DIVERGENCES:
        expected = DIVERGENCES[(recipe, version)][1] if (recipe, version) in DIVERGENCES else REFUSALS[recipe]
        assert code == 2 and expected in err, err
        assert not out.exists() or not any(out.iterdir())
        return
    assert code == 0, err
    ours = {p.name for p in out.iterdir()}
    theirs = {p.name for p in golden.iterdir()}
    if base_less(recipe):  # mergekit's donor of config and tokenizer comes from a Python set
        ours, theirs = ours - set(TOKENIZER), theirs - set(TOKENIZER)
    assert ours == theirs
    for name in sorted(ours & theirs):
        mine, gold = (out / name).read_bytes(), (golden / name).read_bytes()
        if name.endswith(".safetensors") and recipe in SEEDED:
            assert same_layout(out / name, golden / name), name  # random draws: test_random_*
        elif name.endswith(".safetensors") or name in ("model.safetensors.index.json", "mergekit_config.yml"):
            assert mine == gold, f"{name} differs"  # tensors, headers, shard cut, index: bytes
        elif name in TOKENIZER or name == "config.json":
            if base_less(recipe):
                continue  # mergekit's donor comes from a Python set (see NOTES.md); ours is the first model
            if name == "config.json" and RELEASES[version].config_json != "transformers":
                a, b = json.loads(mine), json.loads(gold)
                # mergekit's environment (4.49, 4.57), not the merge; the keys' order: sorted
                a.pop("transformers_version"), b.pop("transformers_version")
                assert a == b
            else:
                assert mine == gold, f"{name} differs"
        elif name == "README.md":
            # identical but for the order of the "Models Merged" bullets (a set in mergekit)
            assert sorted(mine.splitlines()) == sorted(gold.splitlines())
        else:
            pytest.fail(f"unexpected file {name}")


def same_layout(a: Path, b: Path) -> bool:
    """The same safetensors header: names, dtypes, shapes, offsets."""
    from remerge.io.safetensors import read_header

    return read_header(a) == read_header(b)


@pytest.mark.parametrize("recipe", SEEDED)
def test_random_methods_change_as_many_entries_as_mergekit(merged, recipe):
    """mergekit's draws cannot be reproduced once the work is split; the share of entries
    the merge changes from the base must agree within binomial noise."""
    import math

    from safetensors.torch import load_file

    code, err, out = merged[(recipe, "0.1.5")]
    assert code == 0, err
    base = load_file(PARITY / recipe_data(recipe)["base_model"] / "model.safetensors")
    ours, theirs = (load_file(next(d.glob("*.safetensors"))) for d in (out, GOLDENS / "0.1.5" / recipe))
    changed = lambda t: sum(int((t[n].float() != base[n].float()).sum()) for n in base)  # noqa: E731
    n = sum(t.numel() for t in base.values())
    p = changed(theirs) / n
    assert abs(changed(ours) / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1 / n, (changed(ours), changed(theirs), n)


def test_base_less_merges_take_config_and_tokenizer_from_the_first_model(merged):
    import yaml

    code, _, out = merged[("linear_bf16_normalize", "0.1.5")]
    first = yaml.safe_load((PARITY / "recipes" / "linear_bf16_normalize.yml").read_text())["models"][0]["model"]
    donor = PARITY / first
    for name in TOKENIZER:
        if (donor / name).exists():
            assert (out / name).read_bytes() == (donor / name).read_bytes()
