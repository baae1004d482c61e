"""What the Snakemake workflow needs from a config, computed without Snakemake.

- `validate_config`: JSON-Schema plus the checks a schema cannot express, failing with one
  line that names the key and the allowed values.
- grids: canonical value strings (so paths never hold float artefacts) and the rendered
  mergekit recipe of every grid point, with config model names replaced by references.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from remerge.errors import RemergeError
from remerge.io.layout import ELEMENT_SIZES
from remerge.merge.methods import MethodSpec, get_method
from remerge.merge.plan import TensorPlan
from remerge.merge.recipe import Recipe, dump_recipe, parse_recipe
from remerge.merge.releases import VERSIONS, get_release
from remerge.merge.tensor import plan_tensor
from remerge.workflow.paths import DEMO_MODEL, HUB_SNAPSHOT, MODEL_DIR, path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SINGLE_POINT = "single"
# Where the demo's "published" seed merge claims its models were (an author's local paths)
DEMO_AUTHOR_DIR = "/Users/demo-author/Workspace/remerge-demo"


class ConfigError(RemergeError):
    """A workflow config that would fail later: one line naming the key and the fix."""


# --- schema --------------------------------------------------------------------------------


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def schema_message(error) -> str:
    """One line for a jsonschema ValidationError: key, bad value, what is allowed."""
    where = _path(error.absolute_path)
    v, allowed = error.validator, error.validator_value
    if v == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        return (f"unknown key `{extra[0] if extra else '?'}` in {where} "
                f"(allowed: {', '.join(known)})")
    if v == "enum":
        return f"{where}: {error.instance!r} is not allowed (allowed: {', '.join(map(str, allowed))})"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"{where}: {error.instance!r} is out of range: {error.schema.get('description', v)}"
    if v == "required":
        return f"{where}: {error.message}"
    if v == "oneOf":
        return f"{where}: {error.schema.get('description', 'matches none or several of the allowed forms')}"
    if v == "pattern":
        return f"{where}: {error.instance!r} is not allowed: {error.schema.get('description', '')}"
    return f"{where}: {error.message}"


def check_schema(config: Mapping[str, Any], schema_path: str | Path) -> None:
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(f"config error: {schema_message(error)}")


# --- models --------------------------------------------------------------------------------


def model_kind(entry: Mapping[str, Any]) -> str:
    return next(k for k in ("demo", "path", "repo") if k in entry)


def model_reference(name: str, entry: Mapping[str, Any]) -> str:
    """How recipes and cards name the model: hub id, local path, or the demo folder."""
    kind = model_kind(entry)
    if kind == "demo":
        return path(DEMO_MODEL, name=entry["demo"])
    return str(entry[kind])


def model_folder(name: str, entry: Mapping[str, Any]) -> str:
    """Where the model's files are once its manifest exists."""
    kind = model_kind(entry)
    return path(HUB_SNAPSHOT, model=name) if kind == "repo" else model_reference(name, entry)


def stage_entry(merge: str) -> dict[str, str]:
    """A merge that another merge's recipe names (a chain's earlier stage), as a `models:`
    entry: a local folder, its output (it has no grid: one model)."""
    return {"path": path(MODEL_DIR, merge=merge, point=SINGLE_POINT)}


def recipe_inputs(models: Mapping[str, Any], merges: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Everything a recipe may name: the config's models, and every merge as its output folder
    (a name that is both is refused by `check_config`)."""
    return {**{m: stage_entry(m) for m in merges}, **models}


# --- merges and grids ----------------------------------------------------------------------


def canonical(value: Any) -> str:
    """The one spelling of a grid value in paths: repr of the float (0.5, 1.0, 0.30000001)."""
    return repr(float(value))


@dataclass(frozen=True)
class MergeSpec:
    name: str
    recipe: dict  # the template, model names as in config `models:`
    grid: dict[str, list[str]]  # key -> canonical values, in config order
    transplant_from: str | None
    mergekit_version: str | None
    out_shard_size: str
    random_seed: int
    evaluate: bool

    @property
    def points(self) -> list[dict[str, str]]:
        """Every grid point as {key: canonical value} (one empty point without a grid)."""
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*self.grid.values())]

    def models(self) -> list[str]:
        """Names the recipe uses (config models, or merges: `stages`), in recipe order, base last."""
        names = [e["model"] for e in recipe_entries(self.recipe)]
        if self.recipe.get("base_model"):
            names.append(self.recipe["base_model"])
        return list(dict.fromkeys(names))

    def stages(self, models: Mapping[str, Any]) -> list[str]:
        """The merges the recipe reads (a chain's earlier stages): its names not in `models`."""
        return [m for m in self.models() if m not in models]


def merge_spec(name: str, entry: Mapping[str, Any]) -> MergeSpec:
    recipe = entry["recipe"]
    if isinstance(recipe, str):
        try:
            recipe = yaml.safe_load(recipe)
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" (line {where.line + 1} of the recipe text)" if where else ""
            raise ConfigError(f"config error: merges.{name}.recipe: not valid YAML{line}: "
                              f"{getattr(err, 'problem', err)}") from None
    grid = {k: [canonical(v) for v in vals] for k, vals in (entry.get("grid") or {}).items()}
    return MergeSpec(
        name=name, recipe=copy.deepcopy(recipe), grid=grid,
        transplant_from=entry.get("transplant_from"),
        mergekit_version=entry.get("mergekit_version"),
        out_shard_size=str(entry.get("out_shard_size", "5B")),
        random_seed=int(entry.get("random_seed", 0)),
        evaluate=bool(entry.get("evaluate", True)),
    )


def render_recipe(spec: MergeSpec, models: Mapping[str, Mapping[str, Any]], point: Mapping[str, str]) -> str:
    """The mergekit recipe of one grid point, with config names replaced by references."""
    data = copy.deepcopy(spec.recipe)
    base = data.get("base_model")
    method = get_method(data.get("merge_method"))
    for key, value in point.items():
        number = int(float(value)) if method.parameter(key).kind == "integer" else float(value)
        if method.parameter(key).scope == "global":
            data.setdefault("parameters", {})[key] = number
            continue
        for e in recipe_entries(data):  # every merged model (the base too, where it is one of them)
            if e["model"] != base or not method.uses_base:
                e.setdefault("parameters", {})[key] = number
    for e in recipe_entries(data):
        e["model"] = model_reference(e["model"], models[e["model"]])
    if base:
        data["base_model"] = model_reference(base, models[base])
    return dump_recipe(canonical_recipe(data))


RECIPE_ORDER = ("models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype")


def canonical_recipe(data: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe with mergekit's key order and sorted parameter names, so that the rendered
    text (a rerun trigger) does not change when the config's keys are merely reordered."""
    def params(p: Any) -> Any:
        return {k: p[k] for k in sorted(p)} if isinstance(p, dict) else p

    def entry(e: Mapping[str, Any]) -> dict[str, Any]:  # model, layer_range, the rest sorted
        first = [k for k in ("model", "layer_range") if k in e]
        rest = sorted(k for k in e if k not in first)
        return {k: params(e[k]) if k == "parameters" else e[k] for k in first + rest}

    def piece(sl: Mapping[str, Any]) -> dict[str, Any]:  # a slice: its sources, the rest sorted
        return {"sources": [entry(e) for e in sl["sources"]],
                **{k: params(sl[k]) if k == "parameters" else sl[k] for k in sorted(sl) if k != "sources"}}

    out: dict[str, Any] = {}
    for key in RECIPE_ORDER + tuple(k for k in data if k not in RECIPE_ORDER):
        if key not in data:
            continue
        if key == "models":
            out[key] = [entry(e) for e in data[key]]
        elif key == "slices":
            out[key] = [piece(sl) for sl in data[key]]
        else:
            out[key] = params(data[key]) if key == "parameters" else data[key]
    return out


def shard_names(plan: Mapping[str, Any]) -> list[str]:
    """Output shard file names from a plan's JSON (without importing torch)."""
    return get_release(plan["version"]).shard_names(len(plan["shards"]))


def point_name(point: Mapping[str, str]) -> str:
    """The Paramspace-style directory of a point (`density~0.5/weight~1.0`), or `single`."""
    return "/".join(f"{k}~{v}" for k, v in point.items()) or SINGLE_POINT


# --- semantic checks -----------------------------------------------------------------------


def check_config(config: Mapping[str, Any]) -> dict[str, MergeSpec]:
    """Checks beyond the schema; returns the merges. Raises ConfigError (one line)."""
    models = config.get("models") or {}
    for name in models:
        if not NAME_RE.match(name):
            raise ConfigError(f"config error: models.{name}: names are letters, digits, _ . - "
                              "(no slashes or leading dots)")
        entry = models[name]
        if "path" in entry and not Path(entry["path"]).is_dir():
            what = "is a file, not a folder" if Path(entry["path"]).exists() else "does not exist"
            raise ConfigError(f"config error: models.{name}.path: {entry['path']} {what}; give the "
                              "folder that holds the model's safetensors and config.json")
    merges = {}
    for name, entry in (config.get("merges") or {}).items():
        if name in merges:
            continue
        if not NAME_RE.match(name) or name in ("models", "demo", "references", "audits"):
            raise ConfigError(f"config error: merges.{name}: not a usable merge name (letters, "
                              "digits, _ . -; not models/demo/references/audits)")
        merges[name] = merge_spec(name, entry)
    for spec in merges.values():
        _check_merge(spec, models, merges)
    _check_cycles(merges, models)
    _check_audits(config.get("audits") or {}, models, merges)
    return merges


def _check_cycles(merges: Mapping[str, MergeSpec], models: Mapping[str, Any]) -> None:
    """Merges that read merges (a chain's stages) must not read each other in a cycle."""
    visited: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = " -> ".join(path[path.index(name):] + [name])
            raise ConfigError(f"config error: merges.{name}.recipe: the merges read each other in a "
                              f"cycle: {cycle}")
        if name in visited:
            return
        for stage in merges[name].stages(models):
            visit(stage, path + [name])
        visited.add(name)

    for name in merges:
        visit(name, [])


def _check_audits(audits: Mapping[str, Any], models: Mapping[str, Any], merges: Mapping[str, MergeSpec]) -> None:
    for name, entry in audits.items():
        where = f"audits.{name}"
        if not NAME_RE.match(name):
            raise ConfigError(f"config error: {where}: names are letters, digits, _ . -")
        published = entry.get("published", "")
        if published.startswith("demo:"):
            if published not in ("demo:pass", "demo:altered"):
                raise ConfigError(f"config error: {where}.published: {published!r} (allowed demo "
                                  "copies: demo:pass, demo:altered)")
            if "seed" not in merges or merges["seed"].grid:
                raise ConfigError(f"config error: {where}.published: {published} is the demo's "
                                  "`seed` merge as published; define merges.seed without a grid")
        for src, dst in (entry.get("path_map") or {}).items():
            if dst not in models and "/" not in dst:
                raise ConfigError(f"config error: {where}.path_map.{src}: `{dst}` is neither a "
                                  f"model name ({', '.join(models)}), a folder nor a hub id")


def recipe_entries(recipe: Mapping[str, Any]) -> list[dict]:
    """The recipe's model entries (`{model: NAME, parameters: ...}`): its `models:`, or the
    `sources` of every slice of a `slices:` recipe, in order."""
    if "models" in recipe:
        return list(recipe["models"])
    return [src for sl in recipe.get("slices") or () for src in sl["sources"]]


def _check_entries(recipe: Any, where: str) -> None:
    """A recipe lists its models under `models:` (entries `- model: NAME`) or `slices:` (each
    with `sources:` of such entries, plus `layer_range`)."""
    if not isinstance(recipe, dict) or not (isinstance(recipe.get("models"), list)
                                            or isinstance(recipe.get("slices"), list)):
        raise ConfigError(f"config error: {where}.recipe must be a mergekit recipe with `models:` "
                          "or `slices:`")
    if "models" in recipe and "slices" in recipe:
        raise ConfigError(f"config error: {where}.recipe has both `models:` and `slices:`; "
                          "mergekit takes one of them")
    entries = [(f"models[{i}]", e) for i, e in enumerate(recipe.get("models") or [])]
    for i, sl in enumerate(recipe.get("slices") or []):
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list):
            raise ConfigError(f"config error: {where}.recipe.slices[{i}]: {sl!r} is not a slice "
                              "`- sources: [...]`")
        entries += [(f"slices[{i}].sources[{j}]", e) for j, e in enumerate(sl["sources"])]
    for at, e in entries:
        if not isinstance(e, dict) or "model" not in e:
            raise ConfigError(f"config error: {where}.recipe.{at}: {e!r} is not an entry "
                              "`- model: NAME` (with optional `parameters:`)")


def _check_merge(spec: MergeSpec, models: Mapping[str, Any], merges: Mapping[str, MergeSpec]) -> None:
    """One merge. Its recipe names models, or merges whose output it reads (a chain's earlier
    stage: one without a grid, and not also the name of a model)."""
    where = f"merges.{spec.name}"
    inputs = recipe_inputs(models, merges)
    recipe = spec.recipe
    _check_entries(recipe, where)
    for ref in [e["model"] for e in recipe_entries(recipe)] + (
        [recipe["base_model"]] if recipe.get("base_model") else []
    ):
        if ref not in inputs:
            raise ConfigError(f"config error: {where}.recipe names model `{ref}`, which is not in "
                              f"models: (known: {', '.join(models) or 'none'}) nor a merge "
                              f"(known: {', '.join(merges) or 'none'})")
        if ref in models and ref in merges:
            raise ConfigError(f"config error: {where}.recipe names `{ref}`, which is both a model "
                              "and a merge; rename one of them")
        if ref in merges and merges[ref].grid:
            raise ConfigError(f"config error: {where}.recipe names `{ref}`, a merge with a grid: a "
                              f"stage another merge reads is one model, so merges.{ref} may have no grid")
    if spec.transplant_from is not None and spec.transplant_from not in models:
        raise ConfigError(f"config error: {where}.transplant_from: `{spec.transplant_from}` is not "
                          f"in models: (known: {', '.join(models)})")
    if spec.mergekit_version is not None and spec.mergekit_version not in VERSIONS:
        raise ConfigError(f"config error: {where}.mergekit_version: {spec.mergekit_version!r} "
                          f"(allowed: {', '.join(VERSIONS)}, or null)")
    _check_grid(spec, where)
    for point in spec.points:
        try:
            recipe_obj = parse_recipe(render_recipe(spec, inputs, point), version=spec.mergekit_version,
                                      strict=True)
        except RemergeError as err:
            raise ConfigError(f"config error: {where}.recipe: {err}") from None
        _check_values(recipe_obj, where)


def grid_parameters(method: MethodSpec) -> list[str]:
    """The parameters of a method a grid may sweep: its numeric ones."""
    return sorted(p.name for p in method.parameters if p.kind in ("number", "integer"))


def _check_grid(spec: MergeSpec, where: str) -> None:
    """Every grid key is a numeric parameter of the recipe's method, every value in its range."""
    try:
        method = get_method(spec.recipe.get("merge_method"))
    except RemergeError as err:
        raise ConfigError(f"config error: {where}.recipe: {err}") from None
    allowed = grid_parameters(method)
    for key, values in spec.grid.items():
        if key not in allowed:
            raise ConfigError(f"config error: unknown key `{key}` in {where}.grid: {method.name} "
                              f"has no numeric parameter of that name (allowed: {', '.join(allowed)})")
        param = method.parameter(key)
        for i, value in enumerate(values):
            v = float(value)
            if param.valid is not None and not param.valid(v):
                raise ConfigError(f"config error: {where}.grid.{key}[{i}]: {v:g} is out of range: "
                                  f"{key} must be {param.allowed}")
            if key == "weight" and v < 0:
                raise ConfigError(f"config error: {where}.grid.weight[{i}]: {v:g} is out of range: "
                                  "weight must be >= 0")


def _numbers(setting: Any):
    if isinstance(setting, bool):
        return
    if isinstance(setting, (int, float)):
        yield setting
    elif isinstance(setting, dict):
        yield from _numbers(setting.get("value"))
    elif isinstance(setting, list):
        for s in setting:
            yield from _numbers(s)


def _check_values(recipe, where: str) -> None:
    places = [("parameters", recipe.parameters)] + [
        (f"models[{i}].parameters", e.parameters) for i, e in enumerate(recipe.entries)
    ]
    ranged = [p for p in recipe.method.parameters if p.valid is not None]
    for place, params in places:
        for param in ranged:
            for v in _numbers(params.get(param.name)):
                if not param.valid(v):
                    raise ConfigError(f"config error: {where}.recipe.{place}.{param.name}: {v} is out "
                                      f"of range: {param.name} must be {param.allowed}")
        for v in _numbers(params.get("weight")):
            if v < 0:
                raise ConfigError(f"config error: {where}.recipe.{place}.weight: {v} is negative "
                                  "(allowed: weight >= 0)")


# --- resources -----------------------------------------------------------------------------

BASELINE_MB = 500  # python + torch + safetensors in a fresh process


def shard_mem_mb(plan: Mapping[str, Any], shard: str, attempt: int = 1, recipe: str | None = None,
                 version: str | None = None) -> int:
    """Memory a merge_shard job needs: the working set of its largest chunk, plus baseline.

    A chunk is what the job computes at once: a tensor, or, for the tasks the merge cuts into
    runs of rows (`remerge.merge.tensor.choose_chunk_rows`: elementwise ones, such as TIES at
    density 1, larger than `CHUNK_ELEMENTS`), one run. Which tasks are cut depends on the
    recipe's values for each tensor, so with `recipe` (the grid point's recipe text, followed
    as mergekit `version`) each task is planned; without it every tensor counts whole (an
    upper bound).

    Per element of that chunk, with m merged models and c bytes per element of the compute
    dtype: the m task vectors, their signs during the election and the int8 signs (m x (2c+1)),
    the base and the result (2c), and the selection kernel's scratch (8). Inputs are mapped
    one at a time, not copied, except composed ones (Mixtral's experts stored one by one,
    `plan["composed"]`), each read into a buffer: their stored bytes too. Measured: about 10
    bytes per element for m = 2 in bf16, where this declares 22 (a killed job is retried with
    half as much again per attempt). The results a chunked job's writer still holds (two
    chunks) fit in the baseline.
    """
    index = shard_names(plan).index(shard)
    tensors = {t["name"]: t for t in plan["tensors"]}
    merged = len(plan["models"]) - (1 if plan.get("base_model") else 0)
    width = {"bfloat16": 2, "float16": 2, "float32": 4}
    parsed = parse_recipe(recipe, version=version) if recipe is not None else None
    largest = 0
    composed = plan.get("composed", {})
    for name in plan["shards"][index]:
        t = tensors[name]
        c = width.get(t["compute_dtype"], 8)
        copied = sum(ELEMENT_SIZES[t["stored"][ref]] for ref, src in t["sources"].items()
                     if src in composed.get(ref, {}))
        largest = max(largest, _chunk_numel(t, parsed) * (merged * (2 * c + 1) + 2 * c + 8 + copied))
    return int((BASELINE_MB + largest / 1e6) * (1 + 0.5 * (attempt - 1))) + 1


def _chunk_numel(tensor: Mapping[str, Any], recipe: Recipe | None) -> int:
    """Elements of a plan's tensor computed at once: as the merge plans its task with this
    recipe, or all of them without one."""
    if recipe is None:
        return math.prod(tensor["shape"])
    return plan_tensor(recipe, TensorPlan(**{**tensor, "shape": tuple(tensor["shape"])})).chunk_numel
