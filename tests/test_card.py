"""Model cards and provenance: the leaderboard-shaped model-index, sections, round trip."""

from huggingface_hub import ModelCard

from remerge.provenance.card import card_text
from remerge.provenance.record import provenance
from remerge.merge.recipe import parse_recipe

RECIPE = """models:
  - model: arcee-ai/Llama-3.1-SuperNova-Lite
    parameters: {weight: 1, density: 1}
merge_method: ties
base_model: meta-llama/Llama-3.1-8B
parameters: {normalize: true, int8_mask: true}
dtype: bfloat16
"""
LEADERBOARD = {"IFEval": 80.96, "BBH": 31.2, "MATH Lvl 5": 15.56, "GPQA": 7.95, "MuSR": 8.5,
               "MMLU-PRO": 32.0, "Average": 29.36}
CARD = {"IFEval": 80.96, "BBH": 51.10, "MATH Lvl 5": 15.56, "GPQA": 30.96, "MuSR": 41.01,
        "MMLU-PRO": 38.80, "Average": 43.065}


def make(tmp_path, scores, transplant=True):
    recipe = parse_recipe(RECIPE)
    inputs = [
        {"reference": ref, "name": name, "source": "hub", "repo_id": ref, "requested_revision": "main",
         "commit": c * 40, "files": [{"path": "config.json", "size": 10, "sha256": c * 64}]}
        for ref, name, c in (("arcee-ai/Llama-3.1-SuperNova-Lite", "instruct", "a"),
                             ("meta-llama/Llama-3.1-8B", "base", "b"))
    ]
    configs = {"transplant_from": "arcee-ai/Llama-3.1-SuperNova-Lite" if transplant else None,
               "replaced": ["config.json", "generation_config.json"] if transplant else [], "files": {}}
    prov = provenance(name="SuperNova-Lite_TIES_with_Base", recipe=recipe, inputs=inputs,
                      tensors={"digest": "d" * 64, "total_size": 16, "shards": ["model.safetensors"],
                               "tensors": {"w": "e" * 64}},
                      configs=configs, scores=scores, grid_point={})
    path = tmp_path / "README.md"
    path.write_text(card_text(recipe, prov, "llama3.1"))
    return ModelCard.load(path), prov


def test_leaderboard_model_index_in_the_bots_shape(tmp_path):
    card, _ = make(tmp_path, {"tasks": {}, "card": CARD, "leaderboard": LEADERBOARD})
    data = card.data.to_dict()
    assert data["license"] == "llama3.1" and data["tags"] == ["mergekit", "merge"]
    assert data["base_model"] == ["arcee-ai/Llama-3.1-SuperNova-Lite", "meta-llama/Llama-3.1-8B"]
    results = data["model-index"][0]["results"]
    by_name = {r["dataset"]["name"]: r for r in results}
    assert list(by_name) == ["IFEval (0-Shot)", "BBH (3-Shot)", "MATH Lvl 5 (4-Shot)", "GPQA (0-shot)",
                             "MuSR (0-shot)", "MMLU-PRO (5-shot)"]
    ifeval = by_name["IFEval (0-Shot)"]
    assert ifeval["dataset"]["type"] == "HuggingFaceH4/ifeval"
    assert ifeval["dataset"]["args"] == {"num_few_shot": 0}
    assert ifeval["metrics"][0] == {"type": "inst_level_strict_acc and prompt_level_strict_acc",
                                    "value": 80.96, "name": "strict accuracy"}
    assert by_name["MMLU-PRO (5-shot)"]["metrics"][0]["value"] == 32.0  # normalized, as the bot
    assert ifeval["source"]["name"].startswith("lm-evaluation-harness")


def test_body_sections_and_results_table(tmp_path):
    card, prov = make(tmp_path, {"tasks": {}, "card": CARD, "leaderboard": LEADERBOARD})
    body = card.content
    assert "[TIES](https://arxiv.org/abs/2306.01708) merge method using " in body
    assert "[meta-llama/Llama-3.1-8B](https://huggingface.co/meta-llama/Llama-3.1-8B) as a base" in body
    assert "* [arcee-ai/Llama-3.1-SuperNova-Lite](https://huggingface.co/arcee-ai/Llama-3.1-SuperNova-Lite)" in body
    assert "```yaml\n" + RECIPE + "\n```" in body  # verbatim, as mergekit writes it
    assert "### Config transplant" in body and "`generation_config.json`" in body
    assert "|Average Score      |43.07|" in body and "|IFEval (0-Shot)    |80.96|" in body
    assert "a" * 40 in body and "b" * 64 in body and "d" * 64 in body  # commits, file hashes, digest
    assert prov["output"]["tensors"] == {"w": "e" * 64} and prov["software"]["remerge"]


def test_card_without_scores_or_transplant(tmp_path):
    card, _ = make(tmp_path, None, transplant=False)
    assert "model-index" not in card.data.to_dict()
    assert "Not evaluated." in card.content and "Config transplant" not in card.content
