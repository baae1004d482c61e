"""The bodies of the workflow's merge jobs, as functions of paths and plain values.

The scripts in `scripts/` are two-line wrappers around these, so everything here can be
tested and reused without Snakemake.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

from remerge.merge.model_files import transplant, write_merge_files
from remerge.io.files import (
    remove_stale_temporaries, sha256_file, write_json_atomic, write_text_atomic,
)
from remerge.hub.manifest import read_manifest
from remerge.merge.plan import Plan, index_json
from remerge.merge.recipe import parse_recipe

log = logging.getLogger(__name__)


def model_folders(manifests: Mapping[str, str]) -> dict[str, Path]:
    """{model reference: folder} from {model reference: manifest path}."""
    return {ref: Path(read_manifest(path)["path"]) for ref, path in manifests.items()}


def clear_stale(*outputs: str | Path | None) -> None:
    """Remove the temporaries a killed earlier attempt of this job left next to its outputs
    (a half-written shard can be gigabytes; nothing would ever remove it otherwise)."""
    for output in outputs:
        if output is not None:
            for tmp in remove_stale_temporaries(output):
                log.info("removed %s, left by an interrupted earlier run", tmp)


def merge_one_shard(
    plan_path: str, recipe_text: str, version: str | None, shard_path: str,
    digests_path: str, threads: int | None = None,
) -> None:
    from remerge.merge.engine import merge_shard
    from remerge.merge.plan import Plan

    plan = Plan.from_json(Path(plan_path).read_text(), where=plan_path)
    recipe = parse_recipe(recipe_text, version=version)
    index = plan.shard_names.index(Path(shard_path).name)
    clear_stale(shard_path, digests_path)
    digests = merge_shard(plan, recipe, index, shard_path, threads=threads, digests=True)
    write_json_atomic(digests_path, digests)


def tensors_digest(digests: Mapping[str, str]) -> str:
    """One digest of a model's tensors: sha256 over `name\\0sha256\\n` lines in name order.

    Independent of how the tensors are cut into shards and of the files' headers."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()


def assemble(
    plan_path: str, digest_paths: Sequence[str], recipe_text: str, index_path: str,
    recipe_path: str, tensors_path: str,
) -> None:
    """The index (always written, also for one shard), the recipe verbatim, and the
    per-tensor sha256 with the overall digest (`tensors.json`)."""

    plan = Plan.from_json(Path(plan_path).read_text(), where=plan_path)
    digests: dict[str, str] = {}
    for path in digest_paths:
        digests.update(json.loads(Path(path).read_text()))
    missing = sorted(set(plan.tensors) - set(digests))
    if missing:
        raise ValueError(f"no digest for tensors {missing[:5]}: re-run their merge_shard jobs")
    write_json_atomic(tensors_path, {
        "digest": tensors_digest(digests),
        "tensors": dict(sorted(digests.items())),
        "total_size": plan.total_size,
        "shards": plan.shard_names,
        "mergekit_version": plan.version,
    })
    write_text_atomic(recipe_path, recipe_text)
    write_text_atomic(index_path, index_json(plan))


def write_configs(
    recipe_text: str, version: str | None, manifests: Mapping[str, str],
    donor_manifest: str | None, donor_name: str | None, config_path: str, record_path: str,
) -> None:
    """mergekit's config and tokenizer files; then the transplant; then a record of both."""
    recipe = parse_recipe(recipe_text, version=version)
    out_dir = Path(config_path).parent
    folders = model_folders(manifests)
    written = {name: recipe.base_model or recipe.inputs[0]
               for name in write_merge_files(recipe, folders, out_dir)}
    replaced: list[str] = []
    if donor_manifest:
        replaced = transplant(Path(read_manifest(donor_manifest)["path"]), out_dir)
        written.update({name: donor_name for name in replaced})
        log.info("transplanted %s from %s", ", ".join(replaced), donor_name)
    record = {
        "transplant_from": donor_name if donor_manifest else None,
        "replaced": replaced,
        "files": {
            name: {"from": source, "sha256": sha256_file(out_dir / name)}
            for name, source in sorted(written.items())
        },
    }
    write_json_atomic(record_path, record)


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


def write_card_and_provenance(
    name: str, recipe_path: str, version: str | None, manifests: Mapping[str, str],
    names: Mapping[str, str | None], licenses: Mapping[str, str | None], tensors_path: str,
    configs_path: str, scores_path: str | None, grid_point: Mapping[str, str],
    card_path: str, provenance_path: str,
) -> None:
    from remerge.provenance.card import card_text, input_record, provenance

    recipe = parse_recipe(Path(recipe_path).read_text(encoding="utf-8"), version=version)
    inputs = [input_record(ref, names.get(ref), read_manifest(manifests[ref])) for ref in recipe.inputs]
    scores = json.loads(Path(scores_path).read_text()) if scores_path else None
    prov = provenance(
        name=name, recipe=recipe, inputs=inputs,
        tensors=json.loads(Path(tensors_path).read_text()),
        configs=json.loads(Path(configs_path).read_text()), scores=scores, grid_point=grid_point,
    )
    donor = recipe.base_model or recipe.inputs[0]
    license = model_license(Path(read_manifest(manifests[donor])["path"]), licenses.get(donor))
    write_json_atomic(provenance_path, prov)
    write_text_atomic(card_path, card_text(prov, recipe, license))


def run_audit(published: str, recipe_file: str | None, path_map: Mapping[str, str],
              transplant_from: str | None, version: str | None, models_dir: str,
              report_path: str) -> str:
    """The audit job: whatever the verdict, the reports are its result (returns the verdict)."""
    from remerge.provenance.audit import audit_model, find_recipe, published_folder, write_reports
    from remerge.hub.references import resolve_reference

    folder = published_folder(published, Path(models_dir))
    text, source = find_recipe(folder, recipe_file)
    report = audit_model(folder, text, source, path_map,
                         resolve=lambda ref: resolve_reference(ref, Path(models_dir)),
                         version=version, transplant_from=transplant_from,
                         published_reference=published)
    write_reports(report, Path(report_path).parent)
    log.info("verdict: %s", report["verdict"])
    return report["verdict"]


def evaluate_and_score(model_dir: str | None, manifest: str | None, settings: Mapping[str, object],
                       samples_dir: str | None, results_path: str, scores_path: str) -> None:
    """lm-eval's full results, then `scores.json` (task scores and, for leaderboard tasks,
    the card and leaderboard tables)."""
    from remerge.evaluation.run import EvalSettings, evaluate_model
    from remerge.evaluation.scores import scores_document

    folder = model_dir or read_manifest(manifest)["path"]
    clear_stale(results_path, scores_path, samples_dir or Path(results_path).with_name("samples"))
    results = evaluate_model(folder, EvalSettings.from_mapping(settings), results_path, samples_dir)
    write_json_atomic(scores_path, scores_document(results))
