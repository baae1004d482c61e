"""The merge as stage functions of paths: plan, shard, assemble, configs, card.

The workflow's scripts call one stage per job (`scripts/*.py`); `remerge merge` calls them all
in one process (`merge_model`). Inputs and outputs are paths and plain values (the recipe as
its text, the release as its version string), so every stage can run in a process of its own.

    stage_plan(recipe, version, folders, plan_path)        plan.json: the shard plan
    stage_shard(plan_path, recipe, version, shard_path)    one output shard (+ tensor digests)
    stage_assemble(plan_path, recipe, model_dir)           index, mergekit_config.yml (+ tensors.json)
    stage_configs(recipe, version, folders, model_dir)     config.json, tokenizer (+ transplant)
    stage_card(recipe, version, name, card_path)           README.md (+ provenance.json)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from remerge.errors import ModelError
from remerge.hub.manifest import read_manifest
from remerge.io.files import clear_stale, sha256_file, write_json_atomic, write_text_atomic
from remerge.merge.model_files import start_transformers_import, transplant, write_merge_files
from remerge.merge.plan import DEFAULT_SHARD_SIZE, Plan, plan_merge, write_index
from remerge.merge.recipe import Recipe, parse_recipe

log = logging.getLogger(__name__)

RECIPE_NAME = "mergekit_config.yml"
CARD_NAME = "README.md"


def stage_plan(recipe_text: str, version: str | None, folders: Mapping[str, str | Path],
               plan_path: str | Path, out_shard_size: int = DEFAULT_SHARD_SIZE) -> Plan:
    """The shard plan, from the input headers alone."""
    plan = plan_merge(parse_recipe(recipe_text, version=version), folders, out_shard_size)
    write_text_atomic(plan_path, plan.to_json())
    return plan


def stage_shard(plan_path: str | Path, recipe_text: str, version: str | None,
                shard_path: str | Path, digests_path: str | Path | None = None,
                threads: int | None = None, seed: int = 0) -> None:
    """One output shard, named as the plan names it; with `digests_path`, the sha256 of each
    of its tensors too."""
    from remerge.merge.stream import merge_shard  # numpy (and torch where needed)

    plan = Plan.read(plan_path)
    name = Path(shard_path).name
    if name not in plan.shard_names:
        raise ModelError(f"{shard_path}: the plan {plan_path} has no shard of that name "
                         f"(it has {', '.join(plan.shard_names)})")
    clear_stale(shard_path, digests_path)
    digests = merge_shard(plan, parse_recipe(recipe_text, version=version),
                          plan.shard_names.index(name), shard_path, threads=threads, seed=seed,
                          digests=digests_path is not None)
    if digests_path is not None:
        write_json_atomic(digests_path, digests)


def stage_assemble(plan_path: str | Path, recipe_text: str, model_dir: str | Path,
                   digest_paths: Sequence[str | Path] = (), tensors_path: str | Path | None = None,
                   always_index: bool = False) -> None:
    """The index (as the release writes it, or `always_index`), the recipe verbatim, and,
    with `tensors_path`, every tensor's sha256 and their digest (`tensors.json`)."""
    from remerge.provenance.record import tensors_digest

    plan = Plan.read(plan_path)
    if tensors_path is not None:
        digests: dict[str, str] = {}
        for path in digest_paths:
            digests.update(_read_json(path, "re-run its shard job"))
        missing = sorted(set(plan.tensors) - set(digests))
        if missing:
            raise ModelError(f"no digest for tensors {missing[:5]}: re-run their shard jobs")
        write_json_atomic(tensors_path, {
            "digest": tensors_digest(digests),
            "tensors": dict(sorted(digests.items())),
            "total_size": plan.total_size,
            "shards": plan.shard_names,
            "mergekit_version": plan.version,
        })
    write_text_atomic(Path(model_dir) / RECIPE_NAME, recipe_text)
    write_index(plan, model_dir, always=always_index)


def stage_configs(recipe_text: str, version: str | None, folders: Mapping[str, str | Path],
                  model_dir: str | Path, transplant_from: str | Path | None = None,
                  donor_name: str | None = None, record_path: str | Path | None = None) -> dict:
    """mergekit's config.json and tokenizer files; then the optional transplant of another
    model's .json files; with `record_path`, a record of which file came from where."""
    recipe = parse_recipe(recipe_text, version=version)
    out_dir = Path(model_dir)
    written = {name: recipe.base_model or recipe.inputs[0]
               for name in write_merge_files(recipe, folders, out_dir)}
    replaced: list[str] = []
    if transplant_from is not None:
        replaced = transplant(Path(transplant_from), out_dir)
        written.update({name: donor_name for name in replaced})
        log.info("transplanted %s from %s", ", ".join(replaced), donor_name)
    record = {
        "transplant_from": donor_name if transplant_from is not None else None,
        "replaced": replaced,
        "files": {name: {"from": source, "sha256": sha256_file(out_dir / name)}
                  for name, source in sorted(written.items())},
    }
    if record_path is not None:
        write_json_atomic(record_path, record)
    return record


@dataclass(frozen=True)
class ProvenanceFiles:
    """What the workflow's card adds to mergekit's, as files: the inputs' manifests, the
    output's tensor digests and config record, the scores; and where provenance.json goes."""

    manifests: Mapping[str, str]  # model reference -> manifest.json
    names: Mapping[str, str | None]  # model reference -> its name in the config
    licenses: Mapping[str, str | None]  # model reference -> licence set in the config
    tensors: str  # tensors.json (stage_assemble)
    configs: str  # configs.json (stage_configs)
    scores: str | None  # scores.json, or None when not evaluated
    grid_point: Mapping[str, str]
    out: str  # provenance.json to write
    stages: Mapping[str, str] = field(default_factory=dict)  # reference -> provenance.json of
    # the merge that made that input (a chain's earlier stage)


def stage_card(recipe_text: str, version: str | None, name: str, card_path: str | Path,
               provenance: ProvenanceFiles | None = None) -> None:
    """README.md: mergekit's card; with `provenance`, remerge's card, which extends it, and
    provenance.json beside it."""
    from remerge.provenance.card import card_text, mergekit_card, model_license

    recipe = parse_recipe(recipe_text, version=version)
    if provenance is None:
        write_text_atomic(card_path, mergekit_card(recipe, name))
        return
    record = provenance_record(recipe, name, provenance)
    donor = recipe.base_model or recipe.inputs[0]
    folder = Path(read_manifest(provenance.manifests[donor])["path"])  # checked: every input has one
    write_json_atomic(provenance.out, record)
    write_text_atomic(card_path, card_text(recipe, record, model_license(folder, provenance.licenses.get(donor))))


def provenance_record(recipe: Recipe, name: str, files: ProvenanceFiles) -> dict[str, Any]:
    from remerge.provenance.record import input_record, provenance, stage_chain

    missing = [ref for ref in recipe.inputs if ref not in files.manifests]
    if missing:
        raise ModelError(f"no manifest given for model(s) {', '.join(missing)} of the recipe")
    inputs = [input_record(ref, files.names.get(ref), read_manifest(files.manifests[ref]))
              for ref in recipe.inputs]
    redo = "re-run the step that writes it"
    stages = {ref: (_read_json(path, redo), sha256_file(path)) for ref, path in files.stages.items()}
    return provenance(name=name, recipe=recipe, inputs=inputs, tensors=_read_json(files.tensors, redo),
                      configs=_read_json(files.configs, redo),
                      scores=_read_json(files.scores, redo) if files.scores else None,
                      grid_point=files.grid_point, chain=stage_chain(stages))


def _read_json(path: str | Path, fix: str) -> Any:
    """A json file an earlier stage wrote; a missing or damaged one is named, with the fix."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ModelError(f"cannot read {path}: {err.strerror}; {fix}") from None
    except ValueError as err:
        raise ModelError(f"{path} is not valid JSON ({err}); {fix}") from None


# --- all stages in one process ---------------------------------------------------------------


def merge_model(recipe: Recipe, folders: Mapping[str, str | Path], out_dir: str | Path,
                out_shard_size: int = DEFAULT_SHARD_SIZE, threads: int | None = None,
                seed: int = 0, shown_text: str | None = None) -> Plan:
    """The whole model folder, as `mergekit-yaml` writes it: every stage, in a hidden staging
    folder moved into `out_dir` only when complete (config.json last), so that a failed or
    killed run leaves no file that looks like a finished model. `shown_text`: the recipe text
    for mergekit_config.yml and the card where it is not the text merged (mergekit-multi
    writes a stage's config as its planner normalized it, `remerge.merge.multi`)."""
    from remerge.provenance.card import mergekit_card

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelError(f"output folder {out_dir} is a file; give a folder (it is created if missing)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".remerge-partial-*"):  # left by a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    staging = out_dir / f".remerge-partial-{os.getpid()}"
    staging.mkdir()
    start_transformers_import(recipe)  # config.json may need it (seconds to import): start now
    text, version = recipe.text, recipe.release.version
    plan_path = staging.parent / f".{staging.name}.plan.json"
    try:
        plan = stage_plan(text, version, folders, plan_path, out_shard_size)
        for i, name in enumerate(plan.shard_names):
            log.info("shard %d/%d: %s", i + 1, len(plan.shards), name)
            stage_shard(plan_path, text, version, staging / name, threads=threads, seed=seed)
        shown = recipe if shown_text is None else replace(recipe, text=shown_text)
        stage_assemble(plan_path, shown.text, staging)
        write_text_atomic(staging / CARD_NAME, mergekit_card(shown, out_dir.name))
        stage_configs(text, version, folders, staging)
        last = [p for p in ("config.json",) if (staging / p).exists()]
        for item in sorted(staging.iterdir(), key=lambda p: p.name in last):
            shutil.move(str(item), out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        plan_path.unlink(missing_ok=True)
    return plan
