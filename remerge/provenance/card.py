"""Model cards (README.md) and provenance.json for merged models.

The card keeps mergekit's sections (merge method linked to its paper, models merged, the
recipe) and the seed's extensions (the config transplant, the results table), and adds what
no published merge card has: a provenance section with every input's repository, resolved
commit and file hashes, the software versions, and a digest of the merged tensors.
`provenance.json` holds the same facts, machine-readable, plus every tensor's sha256.
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from remerge import __version__
from remerge.merge.methods import LEGACY
from remerge.merge.recipe import Recipe
from remerge.evaluation.scores import BENCHMARK_BY_NAME, CARD_ROWS, card_label, card_markdown, format_percent

MERGEKIT_URL = "https://github.com/arcee-ai/mergekit"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
SOFTWARE = ("torch", "safetensors", "transformers", "huggingface_hub", "lm_eval", "snakemake")

# How the Open LLM Leaderboard's bot describes each benchmark in a card's model-index.
LEADERBOARD_DATASETS = {
    "IFEval": ("HuggingFaceH4/ifeval", "inst_level_strict_acc and prompt_level_strict_acc", "strict accuracy"),
    "BBH": ("BBH", "acc_norm", "normalized accuracy"),
    "MATH Lvl 5": ("hendrycks/competition_math", "exact_match", "exact match"),
    "GPQA": ("Idavidrein/gpqa", "acc_norm", "acc_norm"),
    "MuSR": ("TAUR-Lab/MuSR", "acc_norm", "acc_norm"),
    "MMLU-PRO": ("TIGER-Lab/MMLU-Pro", "acc", "accuracy"),
}


def software_versions() -> dict[str, str]:
    versions = {"remerge": __version__, "python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def input_record(reference: str, name: str | None, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """One input model's provenance: where it came from and its files' sha256."""
    return {
        "reference": reference,
        "name": name,
        "source": manifest["source"],
        "repo_id": manifest.get("repo_id"),
        "requested_revision": manifest.get("requested_revision"),
        "commit": manifest.get("commit"),
        "files": manifest["files"],
    }


def provenance(
    *, name: str, recipe: Recipe, inputs: Sequence[Mapping[str, Any]], tensors: Mapping[str, Any],
    configs: Mapping[str, Any], scores: Mapping[str, Any] | None, grid_point: Mapping[str, str],
) -> dict[str, Any]:
    """Everything that explains one merged model, with no timestamps (reruns compare equal)."""
    return {
        "format": "remerge.provenance/1",
        "name": name,
        "grid_point": dict(grid_point),
        "recipe": recipe.text,
        "merge_method": recipe.method.name,
        "mergekit_semantics": recipe.version,
        "inputs": list(inputs),
        "output": {
            "tensors_digest": tensors["digest"],
            "total_size": tensors["total_size"],
            "shards": tensors["shards"],
            "tensors": tensors["tensors"],
        },
        "configs": dict(configs),
        "scores": scores,
        "software": software_versions(),
    }


# --- the card ------------------------------------------------------------------------------


def _hub_name(record: Mapping[str, Any]) -> str:
    return record["repo_id"] or record["reference"]


def _link(record: Mapping[str, Any]) -> str:
    if record["repo_id"]:
        return f"[{record['repo_id']}](https://huggingface.co/{record['repo_id']})"
    return record["reference"]


def eval_results(scores: Mapping[str, Any] | None) -> list[EvalResult]:
    """model-index entries: the leaderboard's normalized scores in the bot's shape, else every
    task's main metric from our own run."""
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


def card_text(prov: Mapping[str, Any], recipe: Recipe, license: str | None) -> str:
    """The whole README.md: front matter (with model-index) and body."""
    inputs = {rec["reference"]: rec for rec in prov["inputs"]}
    base = inputs.get(recipe.base_model) if recipe.base_model else None
    merged = [inputs[ref] for ref in recipe.inputs if ref != recipe.base_model]
    data = ModelCardData(
        library_name="transformers",
        tags=["mergekit", "merge"],
        license=license,
        # hub ids only: the hub's metadata cannot point at a local folder
        base_model=[inputs[ref]["repo_id"] for ref in recipe.inputs if inputs[ref]["repo_id"]] or None,
        model_name=prov["name"],
        eval_results=eval_results(prov["scores"]) or None,
    )
    method = recipe.method
    base_text = f" using {_link(base)} as a base" if base else ""
    body = [
        f"# {prov['name']}", "",
        f"This is a merge of pre-trained language models created using [mergekit]({MERGEKIT_URL})"
        " (reproduced with remerge).", "",
        "## Merge Details", "### Merge Method", "",
        f"This model was merged using the [{method.pretty_name}]({method.paper}) merge method"
        f"{base_text}.", "",
        "### Models Merged", "", "The following models were included in the merge:",
        *[f"* {_link(rec)}" for rec in merged], "",
        "### Configuration", "", "The following YAML configuration was used to produce this model:",
        "", "```yaml", recipe.text.rstrip(), "```", "",
    ]
    if recipe.duplicates:
        body += [f"Note: {', '.join(recipe.duplicates)} is listed more than once. mergekit "
                 f"{LEGACY} counted it once, with the first entry's parameters; mergekit 0.1.5 "
                 "refuses such a recipe.", ""]
    text = "\n".join(body) + "\n" + transplant_section(prov["configs"]) + "\n"
    text += results_section(prov["scores"]) + "\n" + provenance_section(prov)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}").content


def write_card(path: str | Path, text: str) -> None:
    from remerge.io.files import write_text_atomic

    write_text_atomic(path, text)
