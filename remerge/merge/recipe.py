"""mergekit YAML recipes: parsing, validation and per-tensor parameter resolution.

A recipe is taken verbatim (the text goes into `mergekit_config.yml` unchanged). We support
the `models:` form with one merge method over whole models; anything else (slices, modules,
tokenizer merging, LoRA references, methods we do not implement) is refused with a message,
never approximated.

mergekit releases give different bytes for some recipes. `Recipe.release` says whose
semantics to follow (`remerge.merge.releases`): the default release unless told otherwise; a
recipe that lists a model twice follows the newest release that counted it once (the default
one refuses it).
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from remerge.errors import RecipeError
from remerge.merge.methods import MethodSpec, get_method
from remerge.merge.releases import Release, counting_duplicates_once, get_release

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "float": "float32"}
TOP_LEVEL_KEYS = {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype"}
# Keys mergekit knows that we refuse rather than approximate, with the reason.
UNSUPPORTED_KEYS = {
    "slices": "slices (layer ranges) are not supported; list whole models under `models:`",
    "modules": "modules are not supported; list whole models under `models:`",
    "tokenizer_source": "tokenizer merging is not supported (it permutes embeddings); remove "
    "`tokenizer_source` to copy the base model's tokenizer as mergekit does by default",
    "tokenizer": "tokenizer merging is not supported; remove the `tokenizer:` section",
    "chat_template": "`chat_template` is not supported; transplant the instruct model's "
    "tokenizer_config.json instead (the workflow's `transplant_from`)",
}

# A parameter value as written: scalar, gradient list, or list of {filter, value} entries.
Setting = Any


@dataclass(frozen=True)
class ModelEntry:
    """One entry of `models:`: a model reference and its own parameter settings."""

    model: str
    parameters: Mapping[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    text: str  # the YAML exactly as given
    method: MethodSpec
    entries: tuple[ModelEntry, ...]  # as listed, duplicates kept
    base_model: str | None
    parameters: Mapping[str, Setting]
    dtype: str | None
    out_dtype: str | None
    release: Release  # the mergekit release whose semantics to follow

    @property
    def version(self) -> str:
        return self.release.version

    @property
    def inputs(self) -> tuple[str, ...]:
        """Distinct models in recipe order, the base last if it is not listed (mergekit's order)."""
        refs = list(dict.fromkeys(e.model for e in self.entries))
        if self.base_model is not None and self.base_model not in refs:
            refs.append(self.base_model)
        return tuple(refs)

    @property
    def duplicates(self) -> tuple[str, ...]:
        seen: set[str] = set()
        dups = [e.model for e in self.entries if e.model in seen or seen.add(e.model)]
        return tuple(dict.fromkeys(dups))

    @property
    def mergers(self) -> tuple[str, ...]:
        """The models merged (all inputs, for a method that takes the base as one of them)."""
        if self.method.uses_base:
            return tuple(m for m in self.inputs if m != self.base_model)
        return self.inputs

    def with_references(self, mapping: Mapping[str, str]) -> "Recipe":
        """The same recipe with model references renamed (e.g. config names -> hub ids)."""
        data = yaml.safe_load(self.text)
        rename = lambda ref: mapping.get(ref, ref)  # noqa: E731
        for entry in data["models"]:
            entry["model"] = rename(entry["model"])
        if data.get("base_model") is not None:
            data["base_model"] = rename(data["base_model"])
        return parse_recipe(dump_recipe(data), version=self.release.version)


def dump_recipe(data: Mapping[str, Any]) -> str:
    """YAML text of a recipe, keys in the order given (for generated recipes)."""
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=None)


def load_recipe(path: str | Path, version: str | None = None) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror}") from err
    try:
        return parse_recipe(text, version=version)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None


def parse_recipe(text: str, version: str | None = None, strict: bool = False) -> Recipe:
    """Parse and validate a mergekit recipe; `version` forces whose semantics to follow.

    mergekit ignores a parameter its method does not read (a typo included): so does remerge,
    with a warning, unless `strict` (the workflow's own configs), which refuses it."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a YAML mapping with `models`, `merge_method`, ...")
    _check_keys(data)
    method = get_method(data.get("merge_method"))
    entries = tuple(_entry(i, e) for i, e in enumerate(_models_list(data)))
    base = _reference(data.get("base_model"), "base_model") if data.get("base_model") else None
    recipe = Recipe(
        text=text,
        method=method,
        entries=entries,
        base_model=base,
        parameters=_parameters(data.get("parameters"), "parameters"),
        dtype=_dtype(data.get("dtype"), "dtype"),
        out_dtype=_dtype(data.get("out_dtype"), "out_dtype"),
        release=get_release(),
    )
    recipe = _with_release(recipe, version)
    _check_inputs(recipe)
    _check_parameter_names(recipe, strict)
    if not recipe.mergers:
        raise RecipeError("the recipe merges nothing: list at least one model besides the base")
    return recipe


def _check_inputs(recipe: Recipe) -> None:
    """The method's input contract, as mergekit checks it before reading any tensor (the base
    counts as an input; mergekit appends it to the models when it is not listed)."""
    method, release = recipe.method, recipe.release
    if method.name not in release.methods:
        raise RecipeError(
            f"merge_method {method.name}: remerge does not know mergekit {release.version}'s "
            f"{method.name} (it follows {method.name} as mergekit {', '.join(_releases_with(method.name))} "
            "computes it); choose one of those with --mergekit-version or `mergekit_version`"
        )
    if method.needs_base and recipe.base_model is None:
        raise RecipeError(f"merge_method {method.name} needs `base_model`")
    non_base = [m for m in recipe.inputs if m != recipe.base_model]
    for what, refs, (low, high) in (("inputs", recipe.inputs, method.inputs),
                                    ("non-base inputs", non_base, method.non_base)):
        if len(refs) >= low and (high is None or len(refs) <= high):
            continue
        # mergekit's wording: "at least" below the minimum, "exactly"/"at most" above the maximum
        rule = (f"at least {low}" if len(refs) < low else
                f"exactly {high}" if low == high else f"at most {high}")
        listed = ", ".join(refs) or "none"
        base = (" (the base counts as one)" if what == "inputs" and method.uses_base else "")
        raise RecipeError(
            f"`models`: merge_method {method.name} takes {rule} {what}{base}; the recipe has "
            f"{len(refs)}: {listed} (mergekit: 'Merge method requires {rule} {what}')"
        )


def _releases_with(method: str) -> list[str]:
    from remerge.merge.releases import RELEASES

    return [v for v, r in RELEASES.items() if method in r.methods]


def _check_keys(data: Mapping[str, Any]) -> None:
    for key in data:
        if key in UNSUPPORTED_KEYS:
            raise RecipeError(f"`{key}`: {UNSUPPORTED_KEYS[key]}")
        if key not in TOP_LEVEL_KEYS:
            allowed = ", ".join(sorted(TOP_LEVEL_KEYS))
            raise RecipeError(f"unknown key `{key}` (allowed: {allowed})")
    if "models" not in data:
        raise RecipeError("missing `models:` (the list of models to merge)")


def _models_list(data: Mapping[str, Any]) -> list[Any]:
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise RecipeError("`models:` must be a non-empty list of `- model: ...` entries")
    return models


def _entry(index: int, raw: Any) -> ModelEntry:
    where = f"models[{index}]"
    if not isinstance(raw, dict) or "model" not in raw:
        raise RecipeError(f"{where} must be a mapping with a `model:` key")
    unknown = set(raw) - {"model", "parameters"}
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: model, parameters)")
    model = _reference(raw["model"], f"{where}.model")
    return ModelEntry(model=model, parameters=_parameters(raw.get("parameters"), where))


_REF_RE = re.compile(r"^[^\s+]([^+]*[^\s+])?$")  # local paths may hold spaces (D:/My Models/x)


def _reference(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where} must be a model reference (a local folder or a hub id)")
    if "+" in value:
        raise RecipeError(f"{where}: LoRA references (`model+lora`) are not supported: {value!r}")
    if not _REF_RE.match(value):
        raise RecipeError(f"{where}: not a model reference: {value!r}")
    return value


def _parameters(raw: Any, where: str) -> dict[str, Setting]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}.parameters must be a mapping of name: value")
    for name, setting in raw.items():
        _check_setting(setting, f"{where}.parameters.{name}")
    return dict(raw)


def _check_setting(setting: Setting, where: str) -> None:
    if isinstance(setting, (bool, int, float)):
        return
    if isinstance(setting, list) and setting:
        if all(isinstance(v, (bool, int, float)) for v in setting):
            return  # a gradient over the layers
        if all(isinstance(v, dict) for v in setting):
            for i, cond in enumerate(setting):
                if "value" not in cond or set(cond) - {"filter", "value"}:
                    raise RecipeError(f"{where}[{i}] must be {{filter: ..., value: ...}}")
                _check_setting(cond["value"], f"{where}[{i}].value")
            return
    if isinstance(setting, dict) and "value" in setting and not set(setting) - {"filter", "value"}:
        _check_setting(setting["value"], f"{where}.value")
        return
    raise RecipeError(
        f"{where}: {setting!r} is not a number, a gradient list of numbers, "
        "or a list of {filter, value} entries"
    )


def _dtype(value: Any, key: str) -> str | None:
    if value is None:
        return None
    name = DTYPE_ALIASES.get(value, value)
    if name not in DTYPES:
        raise RecipeError(f"{key} `{value}` is not supported (allowed: {', '.join(DTYPES)})")
    return name


def _with_release(recipe: Recipe, version: str | None) -> Recipe:
    """The recipe with the release to follow: `version`, else the default one; a recipe that
    lists a model twice follows the newest release that counted it once, unless told
    otherwise."""
    from dataclasses import replace

    release = get_release(version)
    if recipe.duplicates:
        names = ", ".join(recipe.duplicates)
        lenient = counting_duplicates_once()
        if release.duplicate_inputs == "refuse" and version is not None:
            raise RecipeError(
                f"model(s) listed twice: {names}. mergekit {release.version} refuses such a "
                f"recipe ('Duplicate merge inputs'); follow mergekit {lenient.version} instead, "
                f"which counted the model once (--mergekit-version {lenient.version})"
            )
        if release.duplicate_inputs == "refuse":
            log.warning("model(s) listed twice: %s. Following mergekit %s: counted once, with the "
                        "first entry's parameters. mergekit %s refuses this recipe.",
                        names, lenient.version, release.version)
            release = lenient
        else:
            log.warning("model(s) listed twice: %s. mergekit %s counted it once, with the first "
                        "entry's parameters; so does remerge.", names, release.version)
    return replace(recipe, release=release)


def _check_parameter_names(recipe: Recipe, strict: bool) -> None:
    method, release = recipe.method, recipe.release
    places: list[tuple[str, Mapping[str, Setting]]] = [("parameters", recipe.parameters)]
    places += [(f"models[{i}].parameters", e.parameters) for i, e in enumerate(recipe.entries)]
    known = sorted(method.parameter_names)
    for where, params in places:
        for name in params:
            if name not in method.parameter_names:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean `{close[0]}`?" if close else ""
                message = (f"{where}: unknown parameter `{name}` for {method.name} "
                           f"(allowed: {', '.join(known) or 'none'}){hint}")
                if strict:
                    raise RecipeError(message)
                log.warning("%s. mergekit ignores it, and so does remerge", message)
                continue
            if not method.parameter(name).read_by(release):
                log.warning(
                    "%s.%s is ignored by %s in mergekit %s (following it for exact bytes)",
                    where, name, method.name, release.version,
                )
