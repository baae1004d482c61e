"""Model cards (README.md): mergekit's, and remerge's, which extends it.

`mergekit_card` is README.md as the followed mergekit release writes it (what `remerge merge`
writes). `card_text` is the workflow's card: the same body (merge method linked to its paper,
models merged, the recipe), a model-index for the scores, and the sections that explain the
model: the config transplant, the results table, and a provenance section with every input's
repository, resolved commit and file hashes, the software versions and a digest of the merged
tensors (`provenance.json`, from `remerge.provenance.record`, holds the same facts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from remerge.evaluation.scores import BENCHMARK_BY_NAME, CARD_ROWS, card_label, card_markdown, format_percent
from remerge.merge.recipe import Recipe
from remerge.merge.releases import counting_duplicates_once, get_release

LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"

# How the Open LLM Leaderboard's bot describes each benchmark in a card's model-index.
LEADERBOARD_DATASETS = {
    "IFEval": ("HuggingFaceH4/ifeval", "inst_level_strict_acc and prompt_level_strict_acc", "strict accuracy"),
    "BBH": ("BBH", "acc_norm", "normalized accuracy"),
    "MATH Lvl 5": ("hendrycks/competition_math", "exact_match", "exact match"),
    "GPQA": ("Idavidrein/gpqa", "acc_norm", "acc_norm"),
    "MuSR": ("TAUR-Lab/MuSR", "acc_norm", "acc_norm"),
    "MMLU-PRO": ("TIGER-Lab/MMLU-Pro", "acc", "accuracy"),
}


# --- mergekit's card -------------------------------------------------------------------------


def is_hub_id(ref: str) -> bool:
    """mergekit's test for a hub id: not starting with / or ~, at most one /."""
    return not ref.startswith(("/", "~")) and ref.count("/") == 1 and not Path(ref).exists()


def _link(ref: str) -> str:
    return f"[{ref}](https://huggingface.co/{ref})" if is_hub_id(ref) else ref


def merge_details(recipe: Recipe, name: str) -> str:
    """The body of mergekit's card: title, method (as the release names it), models merged
    (in recipe order: mergekit's own order comes from a Python set), the recipe verbatim."""
    method = recipe.method.card_name(recipe.release)
    named_base = recipe.base_model if recipe.method.card_base else None  # slerp lists it as merged
    base = f" using {_link(named_base)} as a base" if named_base else ""
    merged = "\n".join(f"* {_link(ref)}" for ref in recipe.inputs if ref != named_base)
    return (
        f"# {name}\n\n"
        "This is a merge of pre-trained language models created using "
        "[mergekit](https://github.com/cg123/mergekit).\n\n"
        "## Merge Details\n### Merge Method\n\n"
        f"This model was merged using the {method} merge method{base}.\n\n"
        "### Models Merged\n\nThe following models were included in the merge:\n"
        f"{merged}\n\n### Configuration\n\n"
        "The following YAML configuration was used to produce this model:\n\n"
        f"```yaml\n{recipe.text}\n```\n"
    )


def mergekit_card(recipe: Recipe, name: str) -> str:
    """README.md as mergekit writes it: front matter (hub ids without revision), then the body."""
    hub_ids = [ref.split("@")[0] for ref in recipe.inputs if is_hub_id(ref)]
    front = yaml.safe_dump({"base_model": hub_ids, "library_name": "transformers",
                            "tags": ["mergekit", "merge"]})
    return f"---\n{front}\n---\n" + merge_details(recipe, name)


# --- remerge's card ---------------------------------------------------------------------------


def _hub_name(record: Mapping[str, Any]) -> str:
    return record["repo_id"] or record["reference"]


def eval_results(scores: Mapping[str, Any] | None) -> list:
    """model-index entries: the leaderboard's normalized scores in the bot's shape, else every
    task's main metric from our own run."""
    from huggingface_hub import EvalResult

    if not scores:
        return []
    source = {"source_name": "lm-evaluation-harness (run by remerge)", "source_url": LM_EVAL_URL}
    results = []
    if scores.get("leaderboard"):
        for row in CARD_ROWS:
            value = scores["leaderboard"].get(row)
            if value is None:
                continue
            dataset, metric, metric_name = LEADERBOARD_DATASETS[row]
            shots = BENCHMARK_BY_NAME[row].shots
            results.append(EvalResult(
                task_type="text-generation", task_name="Text Generation", dataset_type=dataset,
                dataset_name=card_label(row), dataset_args={"num_few_shot": shots},
                metric_type=metric, metric_value=round(value, 2), metric_name=metric_name, **source,
            ))
        return results
    for task, metrics in sorted(scores.get("tasks", {}).items()):
        for metric, value in sorted(metrics.items()):
            results.append(EvalResult(
                task_type="text-generation", task_name="Text Generation", dataset_type=task,
                dataset_name=task, metric_type=metric, metric_value=round(100 * value, 2),
                metric_name=metric, **source,
            ))
    return results


def results_section(scores: Mapping[str, Any] | None) -> str:
    if not scores:
        return "## Evaluation\n\nNot evaluated.\n"
    if scores.get("card"):
        return (
            "## Open LLM Leaderboard Evaluation Results\n\n"
            "Raw scores x 100 and their mean, in the format of the seed's card (lm-eval run "
            "by remerge; the leaderboard's normalized scores are in the model-index above):\n\n"
            + card_markdown(scores["card"])
        )
    lines = ["## Evaluation", "", "lm-eval run by remerge (accuracy in percent):", "",
             "|Task|Metric|Value|", "|----|------|----:|"]
    for task, metrics in sorted(scores.get("tasks", {}).items()):
        for metric, value in sorted(metrics.items()):
            lines.append(f"|{task}|{metric}|{format_percent(100 * value)}|")
    return "\n".join(lines) + "\n"


def transplant_section(configs: Mapping[str, Any]) -> str:
    if not configs.get("transplant_from"):
        return ""
    files = ", ".join(f"`{f}`" for f in configs["replaced"])
    return (
        "### Config transplant\n\n"
        f"After the merge, the merge's .json files (excluding `model.safetensors.index.json`) "
        f"were replaced with those of {configs['transplant_from']}: {files}.\n"
    )


def provenance_section(prov: Mapping[str, Any]) -> str:
    lines = ["## Provenance", "",
             f"Merged by remerge {prov['software']['remerge']} following mergekit "
             f"{prov['mergekit_semantics']}'s arithmetic byte for byte.", "",
             "|Input|Name|Source|Revision|Commit|", "|-----|----|------|--------|------|"]
    for rec in prov["inputs"]:
        lines.append(f"|{_hub_name(rec)}|{rec['name'] or '-'}|{rec['source']}|"
                     f"{rec['requested_revision'] or '-'}|{rec['commit'] or '-'}|")
    lines += ["", "sha256 of the input files:", ""]
    for rec in prov["inputs"]:
        for f in rec["files"]:
            lines.append(f"- `{_hub_name(rec)}/{f['path']}`: `{f['sha256']}`")
    software = ", ".join(f"{k} {v}" for k, v in prov["software"].items())
    lines += ["", f"Software: {software}.", "",
              f"Digest of the merged tensors (sha256 over `name\\0sha256` lines of every tensor, "
              f"in name order; per-tensor hashes in provenance.json): "
              f"`{prov['output']['tensors_digest']}`", ""]
    return "\n".join(lines)


def chain_section(prov: Mapping[str, Any]) -> str:
    """The earlier stages of a chain of merges (provenance.json's `chain`), first first."""
    if not prov.get("chain"):
        return ""
    lines = ["### Stages", "", "This model is the last stage of a chain of merges; each earlier "
             "stage's output is an input of a later one (provenance.json of each stage holds its "
             "inputs' file hashes).", "", "|Stage|Method|Inputs|Tensors digest|provenance.json sha256|",
             "|-----|------|------|--------------|----------------------|"]
    for stage in prov["chain"]:
        lines.append(f"|{stage['name']}|{stage['merge_method']}|{', '.join(stage['inputs'])}|"
                     f"`{stage['tensors_digest']}`|`{stage['provenance_sha256']}`|")
    lines.append(f"|{prov['name']} (this model)|{prov['merge_method']}|"
                 f"{', '.join(rec['reference'] for rec in prov['inputs'])}|"
                 f"`{prov['output']['tensors_digest']}`|-|")
    return "\n".join(lines) + "\n\n"


def duplicates_note(recipe: Recipe) -> str:
    if not recipe.duplicates:
        return ""
    return (f"Note: {', '.join(recipe.duplicates)} is listed more than once. mergekit "
            f"{counting_duplicates_once().version} counted it once, with the first entry's "
            f"parameters; mergekit {get_release().version} refuses such a recipe.\n\n")


def card_text(recipe: Recipe, prov: Mapping[str, Any], license: str | None) -> str:
    """remerge's README.md: a model-index front matter, mergekit's body, then the sections
    that explain the model (transplant, results, provenance)."""
    from huggingface_hub import ModelCard, ModelCardData

    inputs = {rec["reference"]: rec for rec in prov["inputs"]}
    data = ModelCardData(
        library_name="transformers",
        tags=["mergekit", "merge"],
        license=license,
        # hub ids only: the hub's metadata cannot point at a local folder
        base_model=[inputs[ref]["repo_id"] for ref in recipe.inputs if inputs[ref]["repo_id"]] or None,
        model_name=prov["name"],
        eval_results=eval_results(prov["scores"]) or None,
    )
    text = (merge_details(recipe, prov["name"]) + "\n" + duplicates_note(recipe)
            + chain_section(prov) + transplant_section(prov["configs"]) + "\n"
            + results_section(prov["scores"]) + "\n"
            + provenance_section(prov))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}").content


def model_license(folder: Path, configured: str | None) -> str | None:
    """The licence for a merge's card: the config's, else the base's own card's."""
    if configured:
        return configured
    readme = Path(folder) / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            return ModelCard.load(readme).data.to_dict().get("license")
        except Exception:  # a card without front matter has no licence to take
            return None
    return None
