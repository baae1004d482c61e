"""Recipe parsing, refusals, versions and per-tensor parameter resolution."""

import logging

import pytest

from remerge.errors import RecipeError
from remerge.merge.parameters import evaluate_setting, resolve, tensor_parameters
from remerge.merge.recipe import parse_recipe

SEED = """\
models:
  - model: org/instruct
    parameters: {weight: 1, density: 1}
  - model: org/instruct
    parameters: {weight: 1, density: 1}
merge_method: ties
base_model: org/base
parameters: {density: 1, normalize: true, int8_mask: true}
dtype: bfloat16
"""


def recipe(body: str = "", method: str = "ties", **kw):
    text = f"""models:
  - model: a
    parameters: {{weight: 0.5, density: 0.5}}
  - model: b
    parameters: {{weight: [0.1, 0.9], density: 0.8}}
merge_method: {method}
base_model: base
{body}"""
    return parse_recipe(text, **kw)


def test_text_is_kept_verbatim_and_inputs_ordered():
    r = recipe("dtype: bfloat16\n")
    assert r.text.endswith("dtype: bfloat16\n")
    assert r.inputs == ("a", "b", "base")
    assert r.mergers == ("a", "b")
    assert r.version == "0.1.5"


def test_seed_recipe_follows_0051_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        r = parse_recipe(SEED)
    assert r.version == "0.0.5.1"
    assert r.inputs == ("org/instruct", "org/base")
    assert "refuses" in caplog.text and "org/instruct" in caplog.text


def test_seed_recipe_refused_under_015():
    with pytest.raises(RecipeError, match="listed twice: org/instruct.*0.1.5 refuses"):
        parse_recipe(SEED, version="0.1.5")


@pytest.mark.parametrize("text, message", [
    ("models: [{model: a}]\nmerge_method: slerpp\nbase_model: b\n", "merge_method `slerpp` is not supported.*did you mean `slerp`"),
    ("models: [{model: a}]\nmerge_method: ties\nbase_model: b\nslices: []\n", "slices"),
    ("models: [{model: a}]\nmerge_method: ties\nbase_model: b\ntokenizer_source: union\n"
     "tokenizer: {source: base}\n", "`tokenizer_source` and `tokenizer:` together"),
    ("models: [{model: a+lora}]\nmerge_method: ties\nbase_model: b\n", "LoRA"),
    ("models: [{model: a}]\nmerge_method: ties\nbase_model: b\ndtype: int8\n", "dtype `int8`"),
    ("models: [{model: a}]\nmerge_method: ties\n", "needs `base_model`"),
    ("models: [{model: b}]\nmerge_method: ties\nbase_model: b\n", "merges nothing"),
    ("models: :\n", "not valid YAML"),
])
def test_refusals_name_the_problem(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text)


@pytest.mark.parametrize("text, message", [
    ("models: [{model: a}]\nmerge_method: ties\nbase_model: b\ndtpye: bfloat16\n",
     "unknown key `dtpye` (allowed: base_model, chat_template, dtype, merge_method, models, out_dtype, "
     "parameters, slices, tokenizer, tokenizer_source); did you mean `dtype`?"),
    ("models: [{model: a}]\nmerge_method: ties\nbase_model: b\nint8_mask: true\n", "unknown key `int8_mask`"),
    ("models: [{model: a, paramters: {weight: 1}}]\nmerge_method: ties\nbase_model: b\n",
     "models[0]: unknown key `paramters` (allowed: model, parameters); did you mean `parameters`?"),
])
def test_unknown_keys_are_ignored_as_mergekit_ignores_them_or_refused_when_strict(text, message, caplog):
    """mergekit's recipe models drop keys they do not define (pydantic's default; a published
    recipe with a top-level `int8_mask:` merges in mergekit 0.1.5): so does remerge, warning."""
    with caplog.at_level(logging.WARNING):
        recipe = parse_recipe(text)
    assert message in caplog.text and "mergekit ignores it, and so does remerge" in caplog.text
    assert recipe.dtype is None  # `dtpye: bfloat16` set nothing
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, strict=True)
    assert message in str(err.value)


def test_unknown_parameters_are_ignored_with_a_warning_or_refused_when_strict(caplog):
    text = "models: [{model: a, parameters: {weight: 1, wieght: 2}}]\nmerge_method: ties\nbase_model: b\n"
    with caplog.at_level(logging.WARNING):
        r = parse_recipe(text)
    assert "unknown parameter `wieght` for ties" in caplog.text and "mergekit ignores it" in caplog.text
    assert tensor_parameters(r, "x", 0.0, ["a"])[1]["a"]["weight"] == 1.0
    with pytest.raises(RecipeError, match="unknown parameter `wieght` for ties.*did you mean `weight`"):
        parse_recipe(text, strict=True)


def test_lambda_ignored_by_0051_but_used_by_015(caplog):
    r_new = recipe("parameters: {lambda: 0.8}\n")
    assert tensor_parameters(r_new, "x", 0.0, ["a"])[0]["lambda"] == 0.8
    with caplog.at_level(logging.WARNING):
        r_old = recipe("parameters: {lambda: 0.8}\n", version="0.0.5.1")
    assert tensor_parameters(r_old, "x", 0.0, ["a"])[0]["lambda"] == 1.0  # the default: ignored
    assert "ignored" in caplog.text


def test_gradient_interpolation():
    assert evaluate_setting([0.1, 0.9], "t", 0.0) == 0.1
    assert evaluate_setting([0.1, 0.9], "t", 1.0) == 0.9
    assert evaluate_setting([0.0, 1.0, 0.0], "t", 0.25) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.5, 1.0], "t", 0.5) == 0.5


def test_filters_first_match_wins_and_fall_through():
    setting = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.6}, {"value": 0.9}]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0) == 0.3
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0) == 0.6
    assert evaluate_setting(setting, "model.norm.weight", 0) == 0.9
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", 0) is None


def test_precedence_model_then_global_then_default():
    r = recipe("parameters: {density: 0.3, weight: 2.0}\n")
    assert resolve(r, "density", "w", 0, "a") == 0.5  # the model's own
    assert resolve(r, "density", "w", 0, "b") == 0.8
    assert resolve(r, "normalize", "w", 0) is True  # ties' default
    r2 = parse_recipe("models: [{model: a}]\nmerge_method: ties\nbase_model: base\n"
                      "parameters: {weight: 2.0}\n")
    assert resolve(r2, "weight", "w", 0, "a") == 2.0  # global
    assert resolve(r2, "density", "w", 0, "a") == 1.0  # default


def test_duplicates_take_the_first_entry_that_sets_a_parameter():
    text = """models:
  - model: a
    parameters: {weight: 0.3}
  - model: a
    parameters: {weight: 0.9, density: 0.4}
merge_method: ties
base_model: base
"""
    r = parse_recipe(text)
    assert resolve(r, "weight", "w", 0, "a") == 0.3
    assert resolve(r, "density", "w", 0, "a") == 0.4


@pytest.mark.parametrize("density", [0, 1.5, -0.1])
def test_density_outside_range_is_refused_per_tensor(density):
    r = parse_recipe(f"models: [{{model: a, parameters: {{weight: 1, density: {density}}}}}]\n"
                     "merge_method: ties\nbase_model: base\n")
    with pytest.raises(RecipeError, match=r"`density` for tensor w of model a .* must be in \(0, 1\]"):
        tensor_parameters(r, "w", 0.0, ["a"])


def test_missing_weight_is_named():
    r = parse_recipe("models: [{model: a}]\nmerge_method: ties\nbase_model: base\n")
    with pytest.raises(RecipeError, match="missing `weight` for tensor w of model a"):
        tensor_parameters(r, "w", 0.0, ["a"])


def contract(method: str, models: str, base: str | None = "base", params: str = "") -> str:
    text = f"models:\n{models}merge_method: {method}\n" + (f"base_model: {base}\n" if base else "")
    return text + (f"parameters: {{{params}}}\n" if params else "")


ONE, TWO, THREE = ("".join(f"  - model: m{i}\n    parameters: {{weight: 1}}\n" for i in range(n))
                   for n in (1, 2, 3))


@pytest.mark.parametrize("text, message", [
    (contract("slerp", TWO, params="t: 0.5"),
     "`models`: merge_method slerp takes exactly 2 inputs (the base counts as one); the recipe has 3: m0, m1, base"),
    (contract("slerp", ONE, base=None, params="t: 0.5"), "merge_method slerp needs `base_model`"),
    (contract("nearswap", TWO, params="t: 0.1"), "merge_method nearswap takes exactly 2 inputs"),
    (contract("arcee_fusion", TWO), "merge_method arcee_fusion takes exactly 2 inputs"),
    (contract("nuslerp", ONE), "merge_method nuslerp takes at least 2 non-base inputs; the recipe has 1: m0"),
    (contract("nuslerp", THREE), "merge_method nuslerp takes exactly 2 non-base inputs; the recipe has 3"),
    (contract("model_stock", ONE), "merge_method model_stock takes at least 3 inputs (the base counts as one); "
                                   "the recipe has 2"),
    (contract("passthrough", TWO, base=None), "merge_method passthrough takes exactly 1 inputs; the recipe has 2"),
    (contract("passthrough", ONE), "merge_method passthrough takes exactly 1 inputs; the recipe has 2: m0, base"),
])
def test_method_input_rules_are_refused_as_mergekit_refuses_them(text, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe(text)
    assert message in str(err.value)


def test_a_method_the_followed_release_lacks_is_refused():
    with pytest.raises(RecipeError, match="remerge does not know mergekit 0.0.5.1's slerp.*0.1.5"):
        parse_recipe(contract("slerp", ONE, params="t: 0.5"), version="0.0.5.1")


@pytest.mark.parametrize("method", ["slerp", "nearswap"])
def test_a_required_global_parameter_is_named_with_its_tensor(method):
    r = parse_recipe(contract(method, ONE))
    with pytest.raises(RecipeError, match="missing `t` for tensor model.norm.weight: set it in the global `parameters`"):
        tensor_parameters(r, "model.norm.weight", 0.0, ["m0"])


def test_local_paths_may_hold_spaces_as_in_published_windows_recipes():
    r = parse_recipe(contract("ties", "  - model: 'D:/My Models/ft'\n    parameters: {weight: 1}\n",
                              base="'D:/My Models/base'"))
    assert r.inputs == ("D:/My Models/ft", "D:/My Models/base")
