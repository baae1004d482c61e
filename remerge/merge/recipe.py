"""mergekit YAML recipes: parsing, validation and per-tensor parameter resolution.

A recipe is taken verbatim (the text goes into `mergekit_config.yml` unchanged). We support
both of mergekit's forms with one merge method: `models:` (whole models) and `slices:` (layer
ranges of models, stacked: frankenmerges, and LazyMergekit's slerp), with `tokenizer_source`,
`tokenizer:` and `chat_template` (`remerge.merge.tokenizer`). Anything else (`modules`, LoRA
references, a per-slice base, methods we do not implement) is refused with a message, never
approximated.

mergekit plans a `models:` recipe as one slice of every model's layers, the base appended
when not listed (`Recipe.output_slices`); the plan and the parameters read the slices only,
so both forms go through the same code.

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
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from remerge.errors import RecipeError
from remerge.merge.methods import MethodSpec, get_method
from remerge.merge.releases import Release, counting_duplicates_once, get_release
from remerge.merge.tokenizer import (TokenizerSpec, check_chat_template, check_release,
                                     parse_tokenizer, rename_tokenizer)

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "float": "float32"}
TOP_LEVEL_KEYS = {"models", "slices", "merge_method", "base_model", "parameters", "dtype",
                  "out_dtype", "tokenizer_source", "tokenizer", "chat_template"}
SLICE_KEYS = {"sources", "parameters", "base_model", "residual_weight"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
# Keys mergekit knows that we refuse rather than approximate, with the reason.
UNSUPPORTED_KEYS = {
    "modules": "`modules:` (per-module slices, for models of several modules) is not "
    "supported; write the layers of a one-module model under `slices:`, or whole models under "
    "`models:`",
}

# A parameter value as written: scalar, gradient list, or list of {filter, value} entries.
Setting = Any


@dataclass(frozen=True)
class ModelEntry:
    """One entry of `models:`: a model reference and its own parameter settings."""

    model: str
    parameters: Mapping[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """One source of a slice: layers [start, end) of a model, and its own parameter settings."""

    model: str
    layer_range: tuple[int, int] | None  # None: all of the model's layers (the `models:` form)
    parameters: Mapping[str, Setting] = field(default_factory=dict)

    def length(self) -> int | None:
        return None if self.layer_range is None else self.layer_range[1] - self.layer_range[0]


@dataclass(frozen=True)
class OutputSlice:
    """One entry of `slices:`: output layers made from as many layers of each source."""

    sources: tuple[SliceSource, ...]
    parameters: Mapping[str, Setting] = field(default_factory=dict)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(s.model for s in self.sources)


@dataclass(frozen=True)
class Recipe:
    text: str  # the YAML exactly as given
    method: MethodSpec
    entries: tuple[ModelEntry, ...]  # `models:` as listed, duplicates kept (empty with slices)
    base_model: str | None
    parameters: Mapping[str, Setting]
    dtype: str | None
    out_dtype: str | None
    release: Release  # the mergekit release whose semantics to follow
    slices: tuple[OutputSlice, ...] | None = None  # `slices:` as listed (None: `models:`)
    tokenizer: TokenizerSpec | None = None  # `tokenizer_source` / `tokenizer:` (None: copied)
    chat_template: str | None = None  # as written: auto, a built-in name or a template

    @property
    def version(self) -> str:
        return self.release.version

    @cached_property  # read once per parameter of every tensor
    def output_slices(self) -> tuple[OutputSlice, ...]:
        """The slices mergekit plans: the recipe's own, or for `models:` one slice of every
        model's layers, with the base appended (without parameters) when it is not listed."""
        if self.slices is not None:
            return self.slices
        sources = [SliceSource(e.model, None, e.parameters) for e in self.entries]
        if self.base_model is not None and self.base_model not in [e.model for e in self.entries]:
            sources.append(SliceSource(self.base_model, None))
        return (OutputSlice(tuple(sources)),)

    def post_sources(self) -> tuple[SliceSource, ...]:
        """The sources of the tensors after the layers (final norm, lm_head): the last slice's,
        as many of them as the release takes (`Release.post_weight_sources`)."""
        first, last = self.output_slices[0], self.output_slices[-1]
        if self.release.post_weight_sources == "first_slice_count":
            return last.sources[:len(first.sources)]
        return last.sources

    @property
    def layer_count(self) -> int | None:
        """The merge's number of layers for `slices:`, as mergekit writes `num_hidden_layers`:
        the sum of the slices' lengths; None for `models:` (the donor's own count stays)."""
        if self.slices is None:
            return None
        return sum(sl.sources[0].length() for sl in self.slices)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Distinct models in recipe order, the base last if it is not listed (mergekit's order)."""
        listed = [s.model for sl in self.slices for s in sl.sources] if self.slices is not None \
            else [e.model for e in self.entries]
        refs = list(dict.fromkeys(listed))
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
        entries = data.get("models") or [src for sl in data["slices"] for src in sl["sources"]]
        for entry in entries:
            entry["model"] = rename(entry["model"])
        if data.get("base_model") is not None:
            data["base_model"] = rename(data["base_model"])
        rename_tokenizer(data, rename)
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
    _check_keys(data, strict)
    method = get_method(data.get("merge_method"))
    sliced = "slices" in data
    entries = () if sliced else tuple(_entry(i, e, strict) for i, e in enumerate(_models_list(data)))
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
        slices=_slices(data["slices"], strict) if sliced else None,
        tokenizer=parse_tokenizer(data, _reference),
        chat_template=_chat_template(data.get("chat_template")),
    )
    recipe = _with_release(recipe, version)
    check_release(recipe)
    check_chat_template(recipe)
    _check_inputs(recipe)
    _check_parameter_names(recipe, strict)
    if not sliced and not recipe.mergers:
        raise RecipeError("the recipe merges nothing: list at least one model besides the base")
    return recipe


def _check_inputs(recipe: Recipe) -> None:
    """The method's input contract, as mergekit checks it before reading any tensor: for
    `models:` over all inputs (the base counts as one; mergekit appends it to the models when
    it is not listed), for `slices:` in every slice (mergekit appends nothing there), and in
    the group of the tensors after the layers."""
    method, release = recipe.method, recipe.release
    if method.name not in release.methods:
        raise RecipeError(
            f"merge_method {method.name}: remerge does not know mergekit {release.version}'s "
            f"{method.name} (it follows {method.name} as mergekit {', '.join(_releases_with(method.name))} "
            "computes it); choose one of those with --mergekit-version or `mergekit_version`"
        )
    if method.needs_base and recipe.base_model is None:
        raise RecipeError(f"merge_method {method.name} needs `base_model`")
    if recipe.slices is None:
        _check_group(method, recipe.inputs, recipe.base_model, "`models`", "the recipe", "")
        return
    for i, sl in enumerate(recipe.slices):
        _check_group(method, sl.models, recipe.base_model, f"`slices[{i}].sources`", "the slice",
                     f" for default.slices[{i}]")
    post = tuple(s.model for s in recipe.post_sources())
    if post != recipe.slices[-1].models:
        _check_group(method, post, recipe.base_model, "`slices`", "the tensors after the layers "
                     f"(final norm, lm_head; mergekit {release.version} takes the first "
                     f"{len(post)} sources of the last slice, as many as the first slice has)",
                     " for lm_head.weight")


def _check_group(method: MethodSpec, refs: tuple[str, ...], base: str | None, where: str,
                 whose: str, group: str) -> None:
    """One group of inputs against the method's contract, in mergekit 0.1.5's order and
    wording (`group`: how mergekit names the group, e.g. ' for default.slices[1]')."""
    dups = [ref for i, ref in enumerate(refs) if ref in refs[:i]]
    if dups:
        raise RecipeError(
            f"{where}: model {dups[0]} is listed twice; list each model once per slice (mergekit "
            f"0.1.5: 'Duplicate merge inputs{group}'; 0.0.5.1 silently kept one of them)")
    if group and method.uses_base and base is not None and base not in refs:
        raise RecipeError(
            f"{where}: base_model {base} is not among the sources of {whose} ({', '.join(refs)}); "
            f"merge_method {method.name} reads the base in every slice: list `- model: {base}` "
            f"there with the slice's layer_range, or make base_model one of the sources "
            f"(mergekit: 'Base input is not present in merge inputs{group}')")
    non_base = [m for m in refs if not (method.uses_base and m == base)]
    for what, group_refs, (low, high) in (("inputs", refs, method.inputs),
                                          ("non-base inputs", non_base, method.non_base)):
        if len(group_refs) >= low and (high is None or len(group_refs) <= high):
            continue
        # mergekit's wording: "at least" below the minimum, "exactly"/"at most" above the maximum
        rule = (f"at least {low}" if len(group_refs) < low else
                f"exactly {high}" if low == high else f"at most {high}")
        listed = ", ".join(group_refs) or "none"
        counted = (" (the base counts as one)" if what == "inputs" and method.uses_base else "")
        raise RecipeError(
            f"{where}: merge_method {method.name} takes {rule} {what}{counted}; {whose} has "
            f"{len(group_refs)}: {listed} (mergekit: 'Merge method requires {rule} {what}{group}')"
        )


def _releases_with(method: str) -> list[str]:
    from remerge.merge.releases import RELEASES

    return [v for v, r in RELEASES.items() if method in r.methods]


def _unknown_keys(where: str, unknown: Iterable[str], allowed: Iterable[str], strict: bool) -> None:
    """Keys a recipe level does not define. mergekit's recipe models ignore them (pydantic's
    default: a typo such as `dtpye:` is dropped, and the merge runs without it), so remerge
    does the same with a warning; `strict` (the workflow's own configs) refuses them."""
    allowed = sorted(allowed)
    for key in sorted(map(str, unknown)):
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        message = f"{where}unknown key `{key}` (allowed: {', '.join(allowed)}){hint}"
        if strict:
            raise RecipeError(message)
        log.warning("%s. mergekit ignores it, and so does remerge", message)


def _check_keys(data: Mapping[str, Any], strict: bool) -> None:
    for key in data:
        if key in UNSUPPORTED_KEYS:
            raise RecipeError(f"`{key}`: {UNSUPPORTED_KEYS[key]}")
    _unknown_keys("", set(data) - set(TOP_LEVEL_KEYS) - set(UNSUPPORTED_KEYS), TOP_LEVEL_KEYS, strict)
    if "models" in data and "slices" in data:
        raise RecipeError("`models` and `slices` together: give one of them (`models:` merges whole "
                          "models, `slices:` layer ranges) (mergekit: 'Exactly one of 'models', "
                          "'slices', or 'modules' must be present')")
    if "models" not in data and "slices" not in data:
        raise RecipeError("missing `models:` (the list of models to merge) or `slices:` (layer ranges)")


def _models_list(data: Mapping[str, Any]) -> list[Any]:
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise RecipeError("`models:` must be a non-empty list of `- model: ...` entries")
    return models


def _entry(index: int, raw: Any, strict: bool) -> ModelEntry:
    where = f"models[{index}]"
    if not isinstance(raw, dict) or "model" not in raw:
        raise RecipeError(f"{where} must be a mapping with a `model:` key")
    _unknown_keys(f"{where}: ", set(raw) - {"model", "parameters"}, ("model", "parameters"), strict)
    model = _reference(raw["model"], f"{where}.model")
    return ModelEntry(model=model, parameters=_parameters(raw.get("parameters"), where))


def _slices(raw: Any, strict: bool) -> tuple[OutputSlice, ...]:
    if not isinstance(raw, list) or not raw:
        raise RecipeError("`slices:` must be a non-empty list of `- sources: [...]` entries")
    return tuple(_slice(i, s, strict) for i, s in enumerate(raw))


def _slice(index: int, raw: Any, strict: bool) -> OutputSlice:
    """One slice: every source must cover as many layers (mergekit checks it while planning)."""
    where = f"slices[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), list) or not raw["sources"]:
        raise RecipeError(f"{where} must be a mapping with a non-empty `sources:` list of "
                          "`- model: ..., layer_range: [start, end]` entries")
    _unknown_keys(f"{where}: ", set(raw) - SLICE_KEYS, ("sources", "parameters"), strict)
    if raw.get("base_model") is not None:
        raise RecipeError(f"{where}.base_model: a per-slice base is not supported; set the "
                          "top-level `base_model` (and list it in every slice's sources)")
    if "residual_weight" in raw:
        log.warning("%s.residual_weight is ignored: mergekit reads it nowhere; so does remerge", where)
    sources = tuple(_source(f"{where}.sources[{j}]", s, strict) for j, s in enumerate(raw["sources"]))
    lengths = {s.length() for s in sources}
    if len(lengths) > 1:
        spans = ", ".join(f"{s.model} {list(s.layer_range)}: {s.length()}" for s in sources)
        raise RecipeError(
            f"{where}: its sources cover different numbers of layers ({spans}); every source of "
            "a slice needs as many layers (mergekit: 'All inputs to a slice must contain the same "
            "number of layers')")
    return OutputSlice(sources, _parameters(raw.get("parameters"), where))


def _source(where: str, raw: Any, strict: bool) -> SliceSource:
    if not isinstance(raw, dict) or "model" not in raw or "layer_range" not in raw:
        raise RecipeError(f"{where} must be a mapping with `model:` and `layer_range: [start, end]`")
    _unknown_keys(f"{where}: ", set(raw) - SOURCE_KEYS, SOURCE_KEYS, strict)
    model = _reference(raw["model"], f"{where}.model")
    return SliceSource(model, _layer_range(raw["layer_range"], f"{where}.layer_range"),
                       _parameters(raw.get("parameters"), where))


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    """[start, end): layers start..end-1 of the model. mergekit also takes end < start (it then
    writes a num_hidden_layers that disagrees with the tensors); remerge refuses that."""
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise RecipeError(f"{where} must be two layer numbers [start, end] (end excluded), not {value!r}")
    start, end = value
    if start < 0 or end < start:
        raise RecipeError(f"{where} {value}: layers run from start (0 or more) up to end "
                          "(excluded, end >= start), e.g. [0, 16]")
    return (start, end)


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


def _chat_template(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise RecipeError("chat_template is `auto`, a built-in name (chatml, llama3, ...) or a Jinja "
                          "template, as a string")
    return value or None


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
    for i, sl in enumerate(recipe.slices or ()):
        places.append((f"slices[{i}].parameters", sl.parameters))
        places += [(f"slices[{i}].sources[{j}].parameters", s.parameters)
                   for j, s in enumerate(sl.sources)]
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
