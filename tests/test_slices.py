"""mergekit's `slices:` form: parsing, parameter precedence, refusals, the plan of a
frankenmerge, the save order, config.json and the card (the bytes: tests/test_parity.py)."""

import json
import logging
from pathlib import Path

import pytest

from remerge.errors import ModelError, RecipeError
from remerge.merge.parameters import resolve, setting_scopes, tensor_parameters
from remerge.merge.plan import plan_merge
from remerge.merge.recipe import parse_recipe
from remerge.merge.releases import get_release
from remerge.merge.schedule import Read, save_order

PARITY = Path(__file__).resolve().parent / "parity"
MODELS = PARITY / "models"


def src(model: str, start: int, end: int, params: str = "") -> str:
    extra = f"\n        parameters: {params}" if params else ""
    return f"      - model: {model}\n        layer_range: [{start}, {end}]{extra}\n"


def sliced(*slices: str, tail: str = "merge_method: passthrough\n", **kw):
    body = "slices:\n" + "".join(slices) + tail
    return parse_recipe(body, **kw)


def sl(*sources: str, params: str = "") -> str:
    extra = f"    parameters: {params}\n" if params else ""
    return "  - sources:\n" + "".join(sources) + extra


TIES = """merge_method: ties
base_model: base
parameters: {weight: 0.5, density: 0.6, normalize: true}
"""


# --- parsing ---------------------------------------------------------------------------------


def test_slices_parse_into_sources_with_their_own_parameters():
    r = sliced(sl(src("base", 0, 2), src("a", 0, 2, "{weight: 0.9}"), params="{density: 0.7}"),
               sl(src("base", 2, 3), src("b", 1, 2)), tail=TIES)
    assert r.slices is not None and len(r.slices) == 2
    assert r.slices[0].sources[1].layer_range == (0, 2)
    assert r.slices[0].sources[1].parameters == {"weight": 0.9}
    assert r.slices[0].parameters == {"density": 0.7}
    assert r.inputs == ("base", "a", "b")
    assert r.entries == () and r.layer_count == 3
    assert r.output_slices is r.slices


def test_a_models_recipe_is_one_slice_of_whole_models_with_the_base_appended():
    r = parse_recipe("models:\n  - model: a\n    parameters: {weight: 1}\nmerge_method: ties\n"
                     "base_model: base\n")
    (only,) = r.output_slices
    assert only.models == ("a", "base")
    assert [s.layer_range for s in only.sources] == [None, None]
    assert only.sources[0].parameters == {"weight": 1} and only.sources[1].parameters == {}
    assert r.slices is None and r.layer_count is None


def test_the_base_may_be_absent_for_methods_that_ignore_it_and_counts_are_per_slice():
    r = sliced(sl(src("a", 0, 2)), sl(src("b", 1, 3)), sl(src("a", 1, 2)),
               tail="merge_method: passthrough\nbase_model: a\n")
    assert r.inputs == ("a", "b") and r.layer_count == 5
    r = sliced(sl(src("a", 0, 2)), sl(src("b", 0, 2)), tail="merge_method: passthrough\nbase_model: c\n")
    assert r.inputs == ("a", "b", "c")  # the donor of config.json, as mergekit loads it


def test_zero_layer_slices_are_taken_as_mergekit_takes_them():
    r = sliced(sl(src("a", 0, 2)), sl(src("b", 1, 1)))
    assert r.layer_count == 2


def test_residual_weight_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        sliced("  - sources:\n" + src("a", 0, 2) + "    residual_weight: 0.5\n")
    assert "residual_weight is ignored" in caplog.text


def test_unknown_parameters_in_slices_warn_or_are_refused_when_strict(caplog):
    parts = (sl(src("base", 0, 2), src("a", 0, 2, "{wieght: 1}")),)
    with caplog.at_level(logging.WARNING):
        sliced(*parts, tail=TIES)
    assert "slices[0].sources[1].parameters: unknown parameter `wieght`" in caplog.text
    with pytest.raises(RecipeError, match="slices\\[0\\].sources\\[1\\].parameters: unknown parameter `wieght`"):
        sliced(*parts, tail=TIES, strict=True)


def test_with_references_renames_slice_models():
    r = sliced(sl(src("base", 0, 2), src("a", 0, 2)), tail=TIES)
    renamed = r.with_references({"a": "org/a", "base": "org/base"})
    assert renamed.inputs == ("org/base", "org/a")
    assert renamed.slices[0].sources[1].layer_range == (0, 2)


@pytest.mark.parametrize("body, message", [
    ("slices: []\nmerge_method: passthrough\n", "`slices:` must be a non-empty list"),
    ("slices:\n  - model: a\nmerge_method: passthrough\n", "slices\\[0\\] must be a mapping with a non-empty `sources:`"),
    ("slices:\n  - sources:\n      - model: a\nmerge_method: passthrough\n",
     "slices\\[0\\].sources\\[0\\] must be a mapping with `model:` and `layer_range"),
    ("slices:\n" + sl(src("a", 0, 2)) + "models: [{model: a}]\nmerge_method: passthrough\n",
     "`models` and `slices` together.*Exactly one of 'models', 'slices', or 'modules'"),
    ("modules: {text: {slices: []}}\nmerge_method: passthrough\n", "`modules`: .*not supported"),
    ("merge_method: passthrough\n", "missing `models:`.*or `slices:`"),
    ("slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2, 4]\nmerge_method: passthrough\n",
     "layer_range must be two layer numbers"),
    ("slices:\n" + sl(src("a", -1, 2)) + "merge_method: passthrough\n", "layers run from start"),
    ("slices:\n" + sl(src("a", 2, 1)) + "merge_method: passthrough\n", "layer_range \\[2, 1\\]: layers run from start"),
    ("slices:\n" + sl(src("base", 0, 3), src("a", 0, 2)) + "merge_method: slerp\nbase_model: base\n"
     "parameters: {t: 0.5}\n",
     "slices\\[0\\]: its sources cover different numbers of layers \\(base \\[0, 3\\]: 3, a \\[0, 2\\]: 2\\)"
     ".*'All inputs to a slice must contain the same number of layers'"),
    ("slices:\n" + sl(src("base", 0, 2), src("a", 0, 2), src("a", 0, 2)) + TIES,
     "`slices\\[0\\].sources`: model a is listed twice.*'Duplicate merge inputs for default.slices\\[0\\]'"),
    ("slices:\n" + sl(src("a", 0, 2), src("b", 0, 2)) + TIES,
     "base_model base is not among the sources of the slice \\(a, b\\).*list `- model: base`"
     ".*'Base input is not present in merge inputs for default.slices\\[0\\]'"),
    ("slices:\n" + sl(src("base", 0, 2), src("a", 0, 2), src("b", 0, 2)) + sl(src("base", 2, 3), src("a", 2, 3))
     + "merge_method: model_stock\nbase_model: base\n",
     "`slices\\[1\\].sources`: merge_method model_stock takes at least 3 inputs \\(the base counts as one\\); "
     "the slice has 2: base, a \\(mergekit: 'Merge method requires at least 3 inputs for default.slices\\[1\\]'\\)"),
    ("slices:\n" + sl(src("a", 0, 2), src("b", 0, 2)) + "merge_method: passthrough\n",
     "`slices\\[0\\].sources`: merge_method passthrough takes exactly 1 inputs; the slice has 2"),
    ("slices:\n" + sl(src("base", 0, 2), src("a", 0, 2), src("b", 0, 2)) + "merge_method: slerp\n"
     "base_model: base\nparameters: {t: 0.5}\n", "merge_method slerp takes exactly 2 inputs"),
    ("slices:\n  - sources:\n" + src("a", 0, 2) + "    base_model: a\nmerge_method: passthrough\n",
     "slices\\[0\\].base_model: a per-slice base is not supported"),
    ("slices:\n" + sl(src("a+lora", 0, 2)) + "merge_method: passthrough\n", "LoRA references"),
])
def test_refusals_name_the_key_and_the_fix(body, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(body)


@pytest.mark.parametrize("body, message", [
    ("slices:\n  - sources:\n" + src("a", 0, 2) + "    paramters: {scale: 1}\nmerge_method: passthrough\n",
     "slices[0]: unknown key `paramters` (allowed: parameters, sources); did you mean `parameters`?"),
    ("slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n        layers: 3\n"
     "merge_method: passthrough\n", "slices[0].sources[0]: unknown key `layers`"),
])
def test_unknown_slice_keys_are_ignored_as_mergekit_does_or_refused_when_strict(body, message, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        parse_recipe(body)
    assert message in caplog.text
    with pytest.raises(RecipeError) as err:
        parse_recipe(body, strict=True)
    assert message in str(err.value)


def test_the_tensors_after_the_layers_take_as_many_last_slice_sources_as_the_first_slice_has():
    """0.1.5 zips the last slice's models with a list of the first slice's length; 0.0.5.1
    takes them all. Dropping the base there is refused under 0.1.5 only."""
    parts = (sl(src("base", 0, 2), src("a", 0, 2)), sl(src("a", 2, 3), src("b", 2, 3), src("base", 2, 3)))
    with pytest.raises(RecipeError, match="base_model base is not among the sources of the tensors "
                       "after the layers.*first 2 sources of the last slice.*for lm_head.weight"):
        sliced(*parts, tail=TIES)
    r = sliced(*parts, tail=TIES, version="0.0.5.1")
    assert [s.model for s in r.post_sources()] == ["a", "b", "base"]
    r = sliced(sl(src("a", 0, 2)), sl(src("b", 2, 3, "{weight: 1}"), src("a", 2, 3)),
               tail="merge_method: linear\nparameters: {weight: 1}\n")
    assert [s.model for s in r.post_sources()] == ["b"]


# --- parameters ------------------------------------------------------------------------------


PRECEDENCE = sliced(
    sl(src("base", 0, 2), src("a", 0, 2, "{weight: 0.9}"), src("b", 0, 2), params="{weight: 0.4, normalize: false}"),
    sl(src("base", 2, 4), src("a", 2, 4), src("b", 2, 4, "{density: [0.1, 0.3]}")),
    tail=TIES,
)


@pytest.mark.parametrize("name, model, slice_, t, expected", [
    ("weight", "a", 0, 0.0, 0.9),  # the source's own
    ("weight", "b", 0, 0.0, 0.4),  # the slice's
    ("weight", "a", 1, 0.0, 0.5),  # the top level's
    ("density", "b", 1, 1.0, 0.3),  # a gradient over the slice's own layers
    ("density", "a", 0, 0.0, 0.6),
    ("normalize", None, 0, 0.0, False),  # global-only: the slice, then the top level
    ("normalize", None, 1, 0.0, True),
    ("rescale", None, 1, 0.0, False),  # the default
])
def test_precedence_source_then_slice_then_top_level(name, model, slice_, t, expected):
    assert resolve(PRECEDENCE, name, "model.layers.0.mlp.up_proj.weight", t, model, slice_) == expected


def test_global_only_parameters_skip_the_sources():
    assert setting_scopes(PRECEDENCE, 0, None) == [{"weight": 0.4, "normalize": False}, PRECEDENCE.parameters]
    assert setting_scopes(PRECEDENCE, 0, "a") == [{"weight": 0.9}, {"weight": 0.4, "normalize": False},
                                                  PRECEDENCE.parameters]


def test_per_model_filters_match_the_tensor_the_model_is_asked_for():
    r = sliced(sl(src("base", 1, 3), src("a", 1, 3, "{weight: [{filter: layers.2., value: 0.9}, {value: 0.7}]}")),
               tail="merge_method: ties\nbase_model: base\nparameters: {normalize: [{filter: layers.1., value: false},"
                    " {value: true}]}\n")
    shared, per_model = tensor_parameters(r, "model.layers.1.mlp.up_proj.weight", 1.0, ["a"], 0,
                                          {"a": "model.layers.2.mlp.up_proj.weight"})
    assert per_model["a"]["weight"] == 0.9  # reads layer 2
    assert shared["normalize"] is False  # the output's own name: layer 1


# --- the plan --------------------------------------------------------------------------------


def folders(*names: str) -> dict[str, str]:
    return {f"./models/{n}": str(MODELS / n) for n in names}


def test_plan_of_a_frankenmerge_maps_output_layers_to_source_layers():
    r = parse_recipe((PARITY / "recipes" / "slices_passthrough_frankenmerge.yml").read_text())
    plan = plan_merge(r, folders("ft_a", "ft_b"))
    t = plan.tensors
    assert len(t) == 1 + 7 * 9 + 2
    assert t["model.layers.2.mlp.up_proj.weight"].sources == {"./models/ft_b": "model.layers.1.mlp.up_proj.weight"}
    assert t["model.layers.4.mlp.up_proj.weight"].sources == {"./models/ft_a": "model.layers.1.mlp.up_proj.weight"}
    assert t["model.layers.5.mlp.up_proj.weight"].slice == 3
    assert t["model.layers.4.mlp.up_proj.weight"].t == 1.0  # a one-layer slice
    assert (t["model.layers.2.mlp.up_proj.weight"].t, t["model.layers.3.mlp.up_proj.weight"].t) == (0.0, 1.0)
    assert t["model.embed_tokens.weight"].sources == {"./models/ft_a": "model.embed_tokens.weight"}
    assert t["lm_head.weight"].sources == {"./models/ft_a": "lm_head.weight"} and t["lm_head.weight"].slice == 4
    assert t["model.layers.2.mlp.up_proj.weight"].input_name("./models/ft_b") == "model.layers.1.mlp.up_proj.weight"
    assert plan.slices[1] == [["./models/ft_b", 1, 3]]
    plan.check_recipe(r)
    other = parse_recipe((PARITY / "recipes" / "slices_passthrough_frankenmerge.yml").read_text()
                         .replace("[1, 3]", "[0, 2]"))
    with pytest.raises(RecipeError, match="another recipe"):
        plan.check_recipe(other)


def test_plan_json_round_trips():
    from remerge.merge.plan import Plan

    r = parse_recipe((PARITY / "recipes" / "slices_ties_precedence.yml").read_text())
    plan = plan_merge(r, folders("base", "ft_a", "ft_b"))
    again = Plan.from_json(plan.to_json())
    assert again.tensors == plan.tensors and again.slices == plan.slices and again.shards == plan.shards


def test_a_layer_range_past_the_model_is_refused_before_reading_a_tensor():
    r = parse_recipe((PARITY / "recipes" / "error_slices_layer_range_beyond.yml").read_text())
    with pytest.raises(RecipeError, match="slices\\[1\\].sources\\[0\\].layer_range \\[2, 4\\]: model "
                       "./models/ft_b has 3 layers \\(0 to 2\\); end may be at most 3 \\(mergekit fails "
                       "while merging: 'Tensor model.layers.3."):
        plan_merge(r, folders("ft_a", "ft_b"))


def test_models_of_different_depths_are_refused_in_the_models_form(tmp_path):
    from tinymodels import random_tensors, write_model

    write_model(tmp_path / "a", random_tensors(1, layers=3), layers=3)
    write_model(tmp_path / "b", random_tensors(2, layers=2), layers=2)
    r = parse_recipe("models:\n  - model: a\n  - model: b\nmerge_method: linear\nparameters: {weight: 1}\n")
    with pytest.raises(RecipeError, match="different numbers of layers \\(a: 3, b: 2\\).*'All inputs to a slice"):
        plan_merge(r, {"a": tmp_path / "a", "b": tmp_path / "b"})


def test_a_missing_layer_tensor_names_the_source_layer():
    r = parse_recipe("slices:\n" + sl(src("./models/base", 1, 2), src("./models/ft_missing", 1, 2))
                     + "merge_method: ties\nbase_model: ./models/base\nparameters: {weight: 1}\n")
    with pytest.raises(ModelError, match="tensor model.layers.1.mlp.up_proj.weight is missing from model "
                       "./models/ft_missing .* but present in ./models/base"):
        plan_merge(r, folders("base", "ft_missing"))


# --- save order --------------------------------------------------------------------------------


LAYER = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
         "self_attn.o_proj", "post_attention_layernorm", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj")


def frankenmerge_plan() -> list:
    """ft_a [0, 2], ft_b [1, 3], ft_a [1, 2], ft_b [0, 1] as mergekit plans it (passthrough)."""
    planned = [("model.embed_tokens.weight", [Read("A", "model.embed_tokens.weight", "model.embed_tokens.weight")])]
    out = 0
    for model, start, end in (("A", 0, 2), ("B", 1, 3), ("A", 1, 2), ("B", 0, 1)):
        for layer in range(start, end):
            for suffix in LAYER:
                name = f"model.layers.{layer}.{suffix}.weight"
                planned.append((f"model.layers.{out}.{suffix}.weight", [Read(model, name, name)]))
            out += 1
    planned += [(n, [Read("B", n, n)]) for n in ("model.norm.weight", "lm_head.weight")]
    return planned


def test_save_order_sorts_by_the_name_read_and_breaks_ties_as_each_release_does():
    """Observed with mergekit's --out-shard-size 1 (one tensor per shard, so the index lists
    the save order): output layers 1, 2 and 4 all read a `model.layers.1.` tensor."""
    short = lambda names: [n.replace("model.layers.", "L").replace(".weight", "") for n in names]  # noqa: E731
    old = short(save_order(get_release("0.0.5.1"), frankenmerge_plan()))
    new = short(save_order(get_release("0.1.5"), frankenmerge_plan()))
    assert old[:4] == new[:4] == ["lm_head", "model.embed_tokens", "L5.input_layernorm", "L0.input_layernorm"]
    assert old[-1] == new[-1] == "model.norm"
    # 0.0.5.1: the tensor planned last first, for every kind of tensor
    assert old[20:26] == ["L4.input_layernorm", "L1.input_layernorm", "L2.input_layernorm",
                          "L4.mlp.down_proj", "L1.mlp.down_proj", "L2.mlp.down_proj"]
    # 0.1.5: by its task numbering, explored through a set: not the same for every kind
    assert new[20:26] == ["L2.input_layernorm", "L4.input_layernorm", "L1.input_layernorm",
                          "L1.mlp.down_proj", "L4.mlp.down_proj", "L2.mlp.down_proj"]
    assert new[32:35] == ["L4.post_attention_layernorm", "L1.post_attention_layernorm", "L2.post_attention_layernorm"]


def test_save_order_without_ties_is_sorted_by_name():
    planned = [(n, [Read("A", n, n), Read("B", n, n)]) for n in ("b", "c", "a")]
    for version in ("0.0.5.1", "0.1.5"):
        assert save_order(get_release(version), planned) == ["a", "b", "c"]


def test_a_tied_lm_head_is_saved_next_to_the_embeddings_in_015():
    """It reads model.embed_tokens.weight where a model lacks lm_head (NOTES.md § save order)."""
    planned = [("model.embed_tokens.weight", [Read("A", "model.embed_tokens.weight", "model.embed_tokens.weight")]),
               ("model.layers.0.mlp.up_proj.weight", [Read("A", "model.layers.0.mlp.up_proj.weight",
                                                           "model.layers.0.mlp.up_proj.weight")]),
               ("model.norm.weight", [Read("A", "model.norm.weight", "model.norm.weight")]),
               ("lm_head.weight", [Read("A", "lm_head.weight", "model.embed_tokens.weight")])]
    assert save_order(get_release("0.1.5"), planned)[:2] == ["model.embed_tokens.weight", "lm_head.weight"]


# --- config.json and the card -----------------------------------------------------------------


@pytest.mark.parametrize("version, key", [("0.1.5", "dtype"), ("0.0.5.1", "torch_dtype")])
def test_config_counts_the_stacked_layers(version, key):
    from remerge.merge.model_files import merged_config

    r = parse_recipe((PARITY / "recipes" / "slices_passthrough_frankenmerge.yml").read_text(), version=version)
    config = merged_config(r, MODELS / "ft_a")
    assert config["num_hidden_layers"] == 7 and config[key] == "bfloat16"


def qwen2_donor(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8,
        "intermediate_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 3, "vocab_size": 50, "layer_types": ["full_attention"] * 3}))
    return folder


def test_a_layer_count_that_transformers_refuses_with_layer_types_is_refused_before_merging(tmp_path):
    """mergekit 0.1.5 (transformers 5) fails in save_pretrained after writing every shard."""
    from remerge.merge.model_files import check_config, merged_config

    donor = qwen2_donor(tmp_path / "q")
    text = "slices:\n" + sl(src("q", 0, 2)) + sl(src("q", 1, 3)) + "merge_method: passthrough\n"
    with pytest.raises(ModelError, match="config.json of model q: with num_hidden_layers 4 the config is "
                       "invalid for transformers.*layer_types.*mergekit 0.1.5 fails there"):
        check_config(parse_recipe(text), {"q": donor})
    config = merged_config(parse_recipe(text, version="0.0.5.1"), donor)  # transformers 4.49 era
    assert config["num_hidden_layers"] == 4 and config["layer_types"] == ["full_attention"] * 3
    check_config(parse_recipe("slices:\n" + sl(src("q", 0, 3)) + "merge_method: passthrough\n"), {"q": donor})


def test_card_lists_every_model_of_the_slices_and_names_the_base():
    from remerge.provenance.card import mergekit_card

    r = sliced(sl(src("base", 0, 2), src("a", 0, 2)), sl(src("base", 2, 3), src("b", 2, 3)), tail=TIES)
    card = mergekit_card(r, "x")
    assert "using base as a base" in card
    assert "* a\n* b\n" in card and r.text in card


# --- the merge by hand: one job per shard ------------------------------------------------------


def test_a_frankenmerge_by_hand_one_job_per_shard_gives_mergekits_bytes(tmp_path, monkeypatch, capsys):
    """plan -> merge-shard per shard (any order) -> assemble -> configs -> card, from
    tests/parity as mergekit ran; every file equals mergekit 0.1.5's (--out-shard-size 2K)."""
    from remerge.cli import main

    name = "slices_passthrough_frankenmerge_2k"
    monkeypatch.chdir(PARITY)
    recipe, plan, out = f"recipes/{name}.yml", tmp_path / "plan.json", tmp_path / name
    assert main(["plan", recipe, str(plan), "--out-shard-size", "2K"]) == 0
    shards = capsys.readouterr().out.split()
    assert len(shards) > 1
    for shard in reversed(shards):
        assert main(["merge-shard", str(plan), recipe, str(out / shard)]) == 0
    assert main(["assemble", str(plan), recipe, str(out)]) == 0
    assert main(["configs", recipe, str(out)]) == 0
    assert main(["card", recipe, str(out / "README.md")]) == 0
    golden = PARITY / "goldens" / "0.1.5" / name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in golden.iterdir())
    for f in golden.iterdir():
        if f.name != "README.md":  # its bullets come from a set in mergekit
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_layer_ranges_of_a_model_of_an_unknown_architecture_are_refused(tmp_path):
    """GPT-2 (`h.N.` layers, mergekit's gpt2 template) is not an architecture remerge knows."""
    from safetensors.torch import save_file
    import torch

    folder = tmp_path / "gpt2"
    folder.mkdir()
    save_file({"wte.weight": torch.zeros(4, 2), "h.0.ln_1.weight": torch.ones(2)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    r = parse_recipe("slices:\n" + sl(src("gpt2", 0, 1)) + "merge_method: passthrough\n")
    with pytest.raises(ModelError, match="model gpt2: config.json has no `architectures` and its model_type "
                       "'gpt2' is not one remerge knows \\(known: GPTNeoXForCausalLM, "):
        plan_merge(r, {"gpt2": folder})
