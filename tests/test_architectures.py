"""The architecture data (remerge/merge/architectures/*.json) and how the plan follows it: an
unknown architecture is refused in one line, tensors the architecture does not list are not
merged, models of two architectures are refused."""

import json
import logging

import pytest

from remerge.cli import main
from remerge.errors import ModelError, RecipeError
from remerge.merge.architecture import DATA, architecture, architecture_of, known_architectures
from remerge.merge.plan import plan_merge
from remerge.merge.recipe import parse_recipe
from tinymodels import finetune, random_tensors, write_model

LINEAR = "models:\n  - model: a\n  - model: b\nmerge_method: linear\ndtype: bfloat16\n"


def test_every_data_file_is_complete_and_consistent():
    keys = {"source", "architectures", "model_type", "layers_key", "pre", "layer_prefix", "layer",
            "post", "optional", "tied", "embeddings"}
    for path in sorted(DATA.glob("*.json")):
        data = json.loads(path.read_text())
        assert keys <= set(data) <= keys | {"unsupported_layouts"}, path.name
        listed = set(data["pre"]) | set(data["post"]) | set(data["layer"])
        assert set(data["optional"]) | set(data["tied"]) | set(data["embeddings"]) <= listed, path.name
        assert set(data["tied"].values()) <= set(data["pre"]), path.name
        assert data["layer_prefix"].endswith("layers."), path.name  # the name helpers rely on it
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
            "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM",
            "GPTNeoXForCausalLM"} <= set(known_architectures())


def test_llama_is_what_remerge_hard_coded_before():
    llama = architecture("LlamaForCausalLM")
    assert llama.pre == ("model.embed_tokens.weight",)
    assert llama.post == ("model.norm.weight", "lm_head.weight")
    assert llama.layer == ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                           "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                           "post_attention_layernorm.weight", "mlp.up_proj.weight",
                           "mlp.gate_proj.weight", "mlp.down_proj.weight")
    assert llama.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert llama.is_optional("lm_head.weight") and not llama.is_optional("model.norm.weight")
    assert llama.layer_name(3, "mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert architecture("Phi3ForCausalLM").post == ("lm_head.weight", "model.norm.weight")  # required, untied


def test_a_config_without_architectures_is_resolved_by_its_model_type():
    assert architecture_of("m", {"model_type": "qwen2"}).name == "Qwen2ForCausalLM"
    assert architecture_of("m", {"model_type": "gemma3_text"}).name == "Gemma3ForCausalLM"


@pytest.fixture
def models(tmp_path):
    base = random_tensors(0)
    write_model(tmp_path / "a", base)
    write_model(tmp_path / "b", finetune(base, 1))
    return tmp_path


def set_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_an_unknown_architecture_is_refused_in_one_line_naming_it(models, monkeypatch, capsys):
    set_config(models / "b", architectures=["FooForCausalLM"], model_type="foo")
    with pytest.raises(ModelError, match="^model b: architecture 'FooForCausalLM' is not one remerge knows "
                       r"\(known: GPTNeoXForCausalLM, .*LlamaForCausalLM, .*\); .* does not guess$"):
        plan_merge(parse_recipe(LINEAR), {"a": models / "a", "b": models / "b"})
    monkeypatch.chdir(models)
    (models / "r.yml").write_text(LINEAR)
    assert main(["merge", "r.yml", "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "architecture 'FooForCausalLM' is not one remerge knows" in err[0]
    assert not (models / "out").exists() or not any((models / "out").iterdir())


def test_no_architectures_and_an_unknown_model_type_is_refused(models):
    set_config(models / "a", architectures=None, model_type="gpt2")
    with pytest.raises(ModelError, match="^model a: config.json has no `architectures` and its model_type "
                       "'gpt2' is not one remerge knows"):
        plan_merge(parse_recipe(LINEAR), {"a": models / "a", "b": models / "b"})


def test_a_model_without_config_json_is_refused(models):
    (models / "b" / "config.json").unlink()
    with pytest.raises(ModelError, match="^model b: cannot read .*config.json .*architecture"):
        plan_merge(parse_recipe(LINEAR), {"a": models / "a", "b": models / "b"})


def test_two_architectures_are_refused(models):
    set_config(models / "b", architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(RecipeError, match="model b is a MistralForCausalLM and model a a LlamaForCausalLM; "
                       "mergekit refuses to mix architectures"):
        plan_merge(parse_recipe(LINEAR), {"a": models / "a", "b": models / "b"})


def test_tensors_the_architecture_does_not_list_are_not_merged(tmp_path, caplog):
    """mergekit merges its definition's tensors only (old Llama checkpoints store rotary
    inv_freq buffers, for one)."""
    import torch

    base = random_tensors(0)
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4), "model.extra.weight": torch.ones(2)}
    write_model(tmp_path / "a", base | extra)
    write_model(tmp_path / "b", finetune(base, 1) | extra)
    with caplog.at_level(logging.WARNING, logger="remerge"):
        plan = plan_merge(parse_recipe(LINEAR), {"a": tmp_path / "a", "b": tmp_path / "b"})
    assert set(plan.tensors) == set(base)
    assert "model a: 2 tensor(s) that mergekit's LlamaForCausalLM definition does not list are not merged" in caplog.text
