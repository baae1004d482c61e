"""The architecture data (remerge/merge/architectures/*.json) and how the plan follows it: an
unknown architecture is refused in one line, tensors the architecture does not list are not
merged, models of two architectures are refused; Mixtral's experts stored one by one are read
as the fused tensors mergekit merges (composed tensors of the model folder)."""

import json
import logging

import pytest

from remerge.cli import main
from remerge.errors import ModelError, RecipeError
from remerge.io.safetensors import ModelFolder
from remerge.merge.architecture import DATA, architecture, architecture_of, known_architectures
from remerge.merge.plan import plan_merge
from remerge.merge.recipe import parse_recipe
from remerge.workflow.config import shard_mem_mb
from tinymodels import finetune, random_tensors, write_model

LINEAR = "models:\n  - model: a\n  - model: b\nmerge_method: linear\ndtype: bfloat16\n"


def test_every_data_file_is_complete_and_consistent():
    keys = {"source", "architectures", "model_type", "layers_key", "pre", "layer_prefix", "layer",
            "post", "optional", "tied", "embeddings"}
    for path in sorted(DATA.glob("*.json")):
        data = json.loads(path.read_text())
        assert keys <= set(data) <= keys | {"checkpoint_layout"}, path.name
        listed = set(data["pre"]) | set(data["post"]) | set(data["layer"])
        assert set(data.get("checkpoint_layout", {}).get("fused", {})) <= set(data["layer"]), path.name
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


# --- Mixtral's experts, stored one by one (block_sparse_moe.experts.N.w1/w2/w3) -------------

MIXTRAL = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", num_hidden_layers=2)
EXPERTS, INTER = 3, 32


def mixtral_tensors(seed: int) -> dict:
    """A tiny Mixtral as transformers saves it (2 layers, 3 experts), bf16."""
    import torch

    from tinymodels import HIDDEN, VOCAB

    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {p + n: (HIDDEN,) for n in ("input_layernorm.weight", "post_attention_layernorm.weight")}
        shapes |= {p + f"self_attn.{x}_proj.weight": (HIDDEN, HIDDEN) for x in "qkvo"}
        shapes[p + "block_sparse_moe.gate.weight"] = (EXPERTS, HIDDEN)
        for e in range(EXPERTS):
            q = p + f"block_sparse_moe.experts.{e}."
            shapes |= {q + "w1.weight": (INTER, HIDDEN), q + "w3.weight": (INTER, HIDDEN),
                       q + "w2.weight": (HIDDEN, INTER)}
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).bfloat16() for n, s in shapes.items()}


def fused(tensors: dict) -> dict:
    """The same model in the fused layout (transformers 5's conversion, spelled out)."""
    import torch

    out = {n.replace(".block_sparse_moe.", ".mlp."): t for n, t in tensors.items() if ".experts." not in n}
    for i in range(2):
        q = f"model.layers.{i}.block_sparse_moe.experts."
        w = {k: torch.stack([tensors[f"{q}{e}.{k}.weight"] for e in range(EXPERTS)]) for k in ("w1", "w2", "w3")}
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = w["w2"]
    return out


def write_mixtral(folder, tensors, shards: int = 1):
    write_model(folder, tensors, shards=shards)
    set_config(folder, **MIXTRAL)
    return folder


def test_composed_tensors_read_any_rows_from_their_parts(tmp_path):
    import numpy as np
    import torch

    parts = {"a": torch.arange(6.0).reshape(3, 2), "b": 10 + torch.arange(6.0).reshape(3, 2)}
    write_model(tmp_path / "m", {n: t.bfloat16() for n, t in parts.items()} | {"c": torch.ones(2)}, shards=2)
    folder = ModelFolder(tmp_path / "m", label="m")
    folder.compose("ab", (4, 3), ["a", "b"])
    whole = torch.cat([parts["a"].reshape(-1), parts["b"].reshape(-1)]).reshape(4, 3).bfloat16()
    assert torch.equal(folder.view("ab"), whole) and torch.equal(folder.load("ab"), whole)
    for rows in [(0, 4), (1, 3), (2, 3), (3, 3)]:  # (1, 3): elements 3 to 9, across both files
        assert torch.equal(folder.view("ab", rows), whole[rows[0]:rows[1]])
        bits = whole[rows[0]:rows[1]].reshape(-1).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(folder.raw("ab", rows), bits)
        folder.prefetch("ab", rows)
    assert folder.info("ab").shape == (4, 3)
    assert folder.composed == {"ab": {"shape": [4, 3], "parts": ["a", "b"]}}
    with pytest.raises(ModelError, match="^model m: cannot read ac from a, c .*one dtype"):
        folder.compose("ac", (4, 2), ["a", "c"])


@pytest.mark.parametrize("chunked", [False, True])
def test_per_expert_mixtral_merges_as_its_fused_layout(tmp_path, monkeypatch, caplog, chunked):
    """Experts stored one by one read as mergekit builds them: the same bytes as the same models
    stored fused; in runs of rows too (one expert a chunk here), and through plan.json."""
    from remerge.merge import tensor as tensor_module
    from remerge.merge.tensor import plan_tensor

    if chunked:
        monkeypatch.setattr(tensor_module, "CHUNK_ELEMENTS", 2 * INTER * 16)  # one expert's rows
    base, ft = mixtral_tensors(0), mixtral_tensors(1)
    for layout, convert in (("split", dict), ("fused", fused)):
        write_mixtral(tmp_path / layout / "a", convert(base), shards=2)
        write_mixtral(tmp_path / layout / "b", convert(ft))
        (tmp_path / layout / "r.yml").write_text(
            "models:\n  - model: a\n    parameters: {weight: 0.7}\n  - model: b\n    parameters: {weight: 0.4}\n"
            "merge_method: linear\ndtype: bfloat16\n")
    monkeypatch.chdir(tmp_path / "split")
    with caplog.at_level(logging.WARNING, logger="remerge"):
        plan = plan_merge(parse_recipe((tmp_path / "split" / "r.yml").read_text()), {"a": "a", "b": "b"})
    assert "not merged" not in caplog.text and "no input stores" not in caplog.text
    up = "model.layers.1.mlp.experts.gate_up_proj"
    assert plan.tensors[up].shape == (EXPERTS, 2 * INTER, 16) and plan.tensors[up].sources == {"a": up, "b": up}
    assert plan.composed["a"][up]["parts"] == [f"model.layers.1.block_sparse_moe.experts.{e}.w{w}.weight"
                                                for e in range(EXPERTS) for w in (1, 3)]
    gate = plan.composed["a"]["model.layers.0.mlp.gate.weight"]  # renamed: one part
    assert gate["parts"] == ["model.layers.0.block_sparse_moe.gate.weight"]
    task = plan_tensor(parse_recipe((tmp_path / "split" / "r.yml").read_text()), plan.tensors[up])
    assert task.chunk_rows == (1 if chunked else None)
    data = json.loads(plan.to_json())  # composed inputs are copied: a shard job declares them
    shard = "model.safetensors"
    assert shard_mem_mb(data, shard) >= shard_mem_mb({**data, "composed": {}}, shard)
    for layout in ("split", "fused"):
        monkeypatch.chdir(tmp_path / layout)
        assert main(["merge", "r.yml", "out", "--out-shard-size", "4K"]) == 0
    split, fuse = (ModelFolder(tmp_path / layout / "out") for layout in ("split", "fused"))
    assert sorted(split.tensors) == sorted(fuse.tensors) == sorted(fused(base))
    for name in split.tensors:
        assert split.info(name).dtype == fuse.info(name).dtype
        assert split.raw(name).tobytes() == fuse.raw(name).tobytes(), name
    assert (split.path / "config.json").read_bytes() == (fuse.path / "config.json").read_bytes()
    # the shard cut differs: mergekit saves the tensors it converts first (their loads have no label)
    order = list(json.loads((split.path / "model.safetensors.index.json").read_text())["weight_map"])
    assert all(".mlp." in n for n in order[:6]) and not any(".mlp." in n for n in order[6:])


def test_experts_missing_a_part_are_refused_in_one_line(tmp_path):
    tensors = mixtral_tensors(0)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    write_mixtral(tmp_path / "a", tensors)
    write_mixtral(tmp_path / "b", mixtral_tensors(1))
    with pytest.raises(ModelError, match=r"^model a: cannot build model.layers.1.mlp.experts.gate_up_proj "
                       r"from its experts' mlp.experts.N.w1.weight, mlp.experts.N.w3.weight: every expert "
                       r"needs each of them, .*\(mergekit fails on this model while merging\)$"):
        plan_merge(parse_recipe(LINEAR), {"a": tmp_path / "a", "b": tmp_path / "b"})


def test_a_mixtral_saved_by_transformers_comes_out_as_transformers_loads_it(tmp_path, monkeypatch):
    """The project's transformers saves the experts one by one and loads them fused (its
    conversion mapping); a passthrough of such a model loads as the same weights."""
    import torch
    import transformers

    config = transformers.MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=16,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=3, num_experts_per_tok=1, head_dim=8)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    stored = ModelFolder(tmp_path / "m").tensors
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in stored
    assert not any(".mlp." in n for n in stored)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yml").write_text("models:\n  - model: m\nmerge_method: passthrough\ndtype: bfloat16\n")
    assert main(["merge", "r.yml", "out"]) == 0
    merged = ModelFolder(tmp_path / "out").tensors
    assert "model.layers.0.mlp.experts.gate_up_proj" in merged and not any("block_sparse_moe" in n for n in merged)
    loaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got)
    assert all(torch.equal(want[n], got[n]) for n in want)
