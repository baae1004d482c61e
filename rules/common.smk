# Config validation, the grid of every merge, and the input functions of all rules.
import json
import os

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.utils import Paramspace, validate

from remerge.workflow import config as wf
from remerge.workflow import paths

try:
    wf.check_schema(config, os.path.join(workflow.basedir, "config", "schema.yaml"))
    validate(config, "../config/schema.yaml")  # fills the schema's defaults
    MERGES = wf.check_config(config)
except wf.ConfigError as err:
    raise WorkflowError(str(err))

MODELS = config["models"]
# what recipes may name: the models, and merges (a chain's earlier stages) as their output folders
INPUTS = wf.recipe_inputs(MODELS, MERGES)
EVAL = config["evaluation"]
AUDITS = config.get("audits") or {}


def paramspace(spec):
    """The merge's grid as a Paramspace over canonical value strings (one wildcard `point`)."""
    if not spec.grid:
        return None
    return Paramspace(pd.DataFrame(spec.points, dtype=str), single_wildcard="point")


SPACES = {name: paramspace(spec) for name, spec in MERGES.items()}


def points(merge):
    """Directory names of the merge's grid points (`density~0.5/weight~1.0`, or `single`)."""
    space = SPACES[merge]
    return [wf.SINGLE_POINT] if space is None else list(space.instance_patterns)


def point_values(wildcards):
    space = SPACES[wildcards.merge]
    if space is None:
        return {}
    return {k: str(v) for k, v in space.instance(wildcards).items()}


wildcard_constraints:
    merge="|".join(map(re.escape, MERGES)) or "^$",
    point=r"single|[A-Za-z_]+~[^/]+(/[A-Za-z_]+~[^/]+)*",
    model="|".join(map(re.escape, MODELS)),
    shard=r"model(-\d{5}-of-\d{5})?",


# --- models ---------------------------------------------------------------------------------


def manifest(model):
    return paths.path(paths.MANIFEST, model=model)


def hub_models():
    return [m for m, e in MODELS.items() if wf.model_kind(e) == "repo"]


def local_models():
    return [m for m, e in MODELS.items() if wf.model_kind(e) != "repo"]


def demo_used():
    return any(wf.model_kind(e) == "demo" for e in MODELS.values())


def local_folder(wildcards):
    entry = MODELS[wildcards.model]
    return wf.model_reference(wildcards.model, entry)


def local_folder_files(wildcards):
    """A `path:` model's files, as its manifest lists them (hidden ones left out), so that
    changing one in place re-records the manifest: a folder's own mtime changes only when
    entries are added or removed. (Demo folders are build_demo_models outputs.)"""
    entry = MODELS[wildcards.model]
    if wf.model_kind(entry) != "path":
        return []
    folder = entry["path"]
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(found)


# --- merges ---------------------------------------------------------------------------------


def recipe_text(wildcards):
    """The mergekit recipe of one grid point (config names replaced by model references)."""
    spec = MERGES[wildcards.merge]
    return wf.render_recipe(spec, INPUTS, point_values(wildcards))


def seed_recipe_text(wildcards):
    """The demo seed merge's recipe (merges.seed has no grid)."""
    return wf.render_recipe(MERGES["seed"], INPUTS, {})


def plan_recipe_text(wildcards):
    """The recipe the shard plan is made from: the template, without grid values (the
    layout does not depend on them, so changing the grid never re-plans)."""
    return wf.render_recipe(MERGES[wildcards.merge], INPUTS, {})


def input_manifest(name):
    """The manifest of a model, or of a merge's output (a chain's earlier stage)."""
    if name in MODELS:
        return manifest(name)
    return paths.path(paths.STAGE_MANIFEST, merge=name, point=wf.SINGLE_POINT)


def merge_manifests(wildcards):
    """{reference: manifest path} of every model the merge reads."""
    spec = MERGES[wildcards.merge]
    return {wf.model_reference(m, INPUTS[m]): input_manifest(m) for m in spec.models()}


def stage_provenances(wildcards):
    """{reference: provenance.json} of the merges this merge reads (a chain's earlier stages)."""
    spec = MERGES[wildcards.merge]
    return {
        wf.model_reference(m, INPUTS[m]): paths.path(
            paths.PROVENANCE, merge=m, point=wf.SINGLE_POINT
        )
        for m in spec.stages(MODELS)
    }


def merge_manifest_files(wildcards):
    return list(merge_manifests(wildcards).values())


def shard_paths(merge, point):
    """The point's output shards, known once the merge's plan (a checkpoint) exists."""
    plan = checkpoints.plan_merge.get(merge=merge).output.plan
    with open(plan) as f:
        names = wf.shard_names(json.load(f))
    return [paths.shard_path(merge, point, n) for n in names]


def shard_files(wildcards):
    return shard_paths(wildcards.merge, wildcards.point)


def merge_mem_mb(plan_path, wildcards, attempt):
    """mem_mb of a merge_shard job, from its tensors' sizes in the plan and the point's recipe
    (which decides the tensors computed in chunks of rows)."""
    try:
        with open(plan_path) as f:
            plan = json.load(f)
    except OSError:
        return wf.BASELINE_MB
    return wf.shard_mem_mb(
        plan,
        f"{wildcards.shard}.safetensors",
        attempt,
        recipe=recipe_text(wildcards),
        version=MERGES[wildcards.merge].mergekit_version,
    )


def shard_digests(wildcards):
    """The per-tensor sha256 files written next to each shard (digests/<shard>.json)."""
    names = [os.path.basename(f) for f in shard_files(wildcards)]
    return [paths.digests_path(wildcards.merge, wildcards.point, n) for n in names]


def transplant_donor(wildcards):
    spec = MERGES[wildcards.merge]
    return spec.transplant_from


# --- evaluation -----------------------------------------------------------------------------


def reference_models():
    if not EVAL["references"]:
        return []
    specs = [spec for spec in MERGES.values() if spec.evaluate]
    bases = [
        spec.recipe.get("base_model") for spec in specs if spec.recipe.get("base_model")
    ]
    used = bases + [m for spec in specs for m in spec.models()]
    # the base models first; merges a merge reads are evaluated as merges, not references
    return [m for m in dict.fromkeys(used) if m in MODELS]


# --- final targets --------------------------------------------------------------------------


def get_final_output():
    out = []
    for name, spec in MERGES.items():
        for point in points(name):
            out.append(paths.path(paths.CARD, merge=name, point=point))
            out.append(paths.path(paths.PROVENANCE, merge=name, point=point))
        if spec.evaluate:
            out += [
                paths.path(paths.GRID_TABLE, merge=name),
                paths.path(paths.GRID_PLOT, merge=name),
            ]
    out += [paths.path(paths.AUDIT_REPORT, audit=a) for a in AUDITS]
    return out


def eval_settings(wildcards):
    """The evaluation settings, as a plain dict (its repr is what rerun detection compares)."""
    keys = (
        "preset",
        "tasks",
        "limit",
        "batch_size",
        "dtype",
        "device",
        "apply_chat_template",
        "fewshot_as_multiturn",
        "seed",
        "log_samples",
        "trust_remote_code",
    )
    return {k: EVAL[k] for k in keys}


def eval_offline():
    """The demo's local tasks need no network: run those evaluations offline."""
    return EVAL["preset"] == "demo" and not EVAL["tasks"]


def eval_gpus(wildcards):
    return 0 if EVAL["device"] == "cpu" else 1


def eval_runtime(wildcards):
    return 30 if EVAL["preset"] == "demo" and not EVAL["tasks"] else 24 * 60


def point_values_of(merge, point):
    """{grid key: canonical value} of a point directory name."""
    if point == wf.SINGLE_POINT:
        return {}
    return dict(part.split("~", 1) for part in point.split("/"))


def card_name(wildcards):
    """The merged model's name in its card: <merge>, plus the grid point's values."""
    values = point_values(wildcards)
    suffix = "".join(f"_{k}-{v}" for k, v in values.items())
    return f"{wildcards.merge}{suffix}"


# --- audits ---------------------------------------------------------------------------------


def _resolve_to(target):
    """An audit map target: a config model name -> its folder; anything else as given."""
    return wf.model_folder(target, MODELS[target]) if target in MODELS else target


def audit_published(wildcards):
    entry = AUDITS[wildcards.audit]
    published = entry["published"]
    if published.startswith("demo:"):
        return paths.path(paths.PUBLISHED_DEMO, copy=published.split(":", 1)[1])
    if published in MODELS or os.path.isdir(published) or "@" in published:
        return _resolve_to(published)
    return f"{published}@{entry['revision']}"  # a hub id, at the audited revision


def audit_published_input(wildcards):
    published = AUDITS[wildcards.audit]["published"]
    if published.startswith("demo:"):
        return audit_published(wildcards)
    return manifest(published) if published in MODELS else []


def audit_path_map(wildcards):
    """Sorted: a params dict's repr (what rerun detection compares) depends on key order."""
    path_map = AUDITS[wildcards.audit]["path_map"]
    return {k: _resolve_to(path_map[k]) for k in sorted(path_map)}


def audit_transplant(wildcards):
    donor = AUDITS[wildcards.audit]["transplant_from"]
    return _resolve_to(donor) if donor else None


def audit_manifests(wildcards):
    entry = AUDITS[wildcards.audit]
    names = list(entry["path_map"].values()) + [entry["transplant_from"]]
    return [manifest(n) for n in names if n in MODELS]
