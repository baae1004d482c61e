"""Multi-stage recipes, as mergekit-multi (mergekit 0.1.5's `mergekit-multi`) reads them.

A multi-stage file holds several YAML documents, each a mergekit recipe, most with a `name:`.
What mergekit-multi does with it (read in its source, `mergekit/scripts/multimerge.py`, and
checked against its output in tests/parity/goldens/0.1.5/multi_*):

- A named stage is written to `os.path.join(INTERMEDIATE_DIR, name)` (`-I`, required); the one
  document without `name:` (at most one) is the final model, written to `--out-path`. Two
  documents with one name, or two without, are refused.
- Any string value anywhere in a document whose model path (the part before `@revision` and
  `+lora`) equals a stage's name is replaced by that stage's path, revision and LoRA kept;
  each name so used makes that stage a dependency. A stage read by its path instead (written
  out, `./stages/x`) is not a dependency there, so mergekit's scheduler may run it after its
  reader; remerge orders it first too. A cycle is refused.
- Each stage's `mergekit_config.yml` and card hold not the document's text but the config as
  its planner normalized it, re-dumped (`MergeConfiguration.to_yaml()`): keys sorted, unknown
  keys and unset ones dropped, `models:` turned into `modules: {default: {slices: [...]}}` with
  one source per model over `[0, its layer count]`, the base appended when not listed.
- `--lazy` (the default) skips a stage whose folder already has config.json and a weight file.

`remerge merge FILE OUT_DIR` runs a file of several documents so, with these differences: the
final stage goes to OUT_DIR (a file whose stages are all named: the one stage no other reads);
`-I` defaults to `OUT_DIR.stages`; an existing intermediate is kept only when its
`mergekit_config.yml` is what this run would write and none of its inputs was re-merged; a
reference to a stage that does not exist, or a stage name that mergekit would also substitute
in a value that is no model reference (`merge_method: ties` with a stage named `ties`), is
refused with one line. A file of one document is a plain recipe (`remerge.merge.recipe`).

    split_stages(text, intermediate_dir) -> [Stage, ...]   in run order, the final one last
    stage_recipe(stage) -> Recipe                           the recipe it merges
    stage_config_yaml(data, layers) -> str                  its mergekit_config.yml and card YAML
    is_current(folder, config_yaml) -> bool                 an intermediate this run may keep

(`remerge.commands.merge` runs the stages, one `remerge.stages.merge_model` each.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from remerge.errors import RecipeError, RemergeError
from remerge.merge.recipe import Recipe, dump_recipe, parse_recipe

# keys whose string values are model references (elsewhere a stage name is a mistake)
REFERENCE_KEYS = ("model", "base_model", "tokenizer_source", "source")
# MergeConfiguration's fields, but the model lists (which become `modules`)
CONFIG_KEYS = ("merge_method", "base_model", "dtype", "tokenizer_source", "tokenizer",
               "chat_template", "out_dtype", "parameters")
MODULE = "default"  # the one module of every single-module architecture
# the weight files by which mergekit-multi's --lazy finds a finished stage
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage file, references to other stages replaced by their paths."""

    name: str | None  # None: the document without `name:`
    document: int  # its position in the file, from 1
    data: dict  # the recipe, without `name`
    needs: tuple[str, ...]  # the stages it reads, in order of first use
    final: bool  # the model the file produces (written to OUT_DIR)

    @property
    def label(self) -> str:
        return _label(self.name, self.document)


def _label(name: str | None, document: int) -> str:
    """How messages name a stage."""
    return f"stage `{name}`" if name else f"the final stage (document {document})"


# --- parsing ---------------------------------------------------------------------------------


def documents(text: str) -> list[Any] | None:
    """The YAML documents of a file; None when it does not parse (the plain recipe path then
    reports the error)."""
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return None


def is_multi_stage(text: str) -> bool:
    docs = documents(text)
    return docs is not None and len(docs) > 1


def is_multi_stage_file(path: str | Path) -> bool:
    try:
        return is_multi_stage(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return False  # the plain path reports it


def split_stages(text: str, intermediate_dir: str) -> list[Stage]:
    """The stages of a multi-stage file, in run order (each after the stages it reads, else in
    document order; the final one last). Raises RecipeError naming the stage."""
    named = _named_documents(text)
    names = [name for name, _ in named if name is not None]
    paths = {name: stage_folder(intermediate_dir, name) for name in names}
    stages = {}
    for i, (name, doc) in enumerate(named, start=1):
        label = _label(name, i)
        data, used = _patch(doc, paths, label)
        needs = tuple(dict.fromkeys(used + _needs_by_path(data, paths, intermediate_dir, label)))
        stages[name] = Stage(name, i, data, needs, final=False)
    order = _run_order(stages)  # first: a cycle is named as one
    final = _final(stages)
    stages[final] = replace(stages[final], final=True)
    return [stages[n] for n in order if n != final] + [stages[final]]


def stage_folder(intermediate_dir: str, name: str) -> str:
    """Where a named stage is written, and how the later stages' recipes then name it: joined
    as text, as mergekit-multi joins it (`./stages` + `x` -> `./stages/x`)."""
    return os.path.join(intermediate_dir, name)


def _named_documents(text: str) -> list[tuple[str | None, dict]]:
    """(name, recipe without `name`) per document; duplicates refused as mergekit refuses them."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise RecipeError(f"not valid YAML: {err}") from None
    out: list[tuple[str | None, dict]] = []
    seen: dict[str | None, int] = {}
    for i, doc in enumerate(docs, start=1):
        if doc is None:
            raise RecipeError(f"document {i} of the multi-stage file is empty; remove the `---` "
                              "that starts it")
        if not isinstance(doc, dict):
            raise RecipeError(f"document {i} of the multi-stage file is not a recipe (a mapping "
                              "with `merge_method`, `models`, ...)")
        doc = dict(doc)
        name = doc.pop("name", None)  # `name: null` is no name, as in mergekit
        if name is not None and (not isinstance(name, str) or not _plain_name(name)):
            raise RecipeError(f"document {i}: `name: {name!r}` must be a folder name (no / or \\, "
                              "not . or ..): the stage is written to <intermediate dir>/<name>")
        if name in seen:
            if name is None:
                raise RecipeError(f"documents {seen[name]} and {i} both have no `name:`; only the "
                                  "final stage may be unnamed (mergekit: Multiple unnamed merge "
                                  "configurations are not supported)")
            raise RecipeError(f"documents {seen[name]} and {i} are both named `{name}` (mergekit: "
                              f"Duplicate merge name {name})")
        seen[name] = i
        out.append((name, doc))
    return out


def _plain_name(name: str) -> bool:
    return bool(name.strip()) and "/" not in name and "\\" not in name and name not in (".", "..")


def _patch(value: Any, paths: Mapping[str, str], label: str, key: str = "") -> tuple[Any, list[str]]:
    """mergekit-multi's substitution: every string whose model path is a stage name becomes
    that stage's path (`x@rev+lora` -> `<dir>/x@rev+lora`). Returns (value, names used)."""
    if isinstance(value, dict):
        used: list[str] = []
        out = {}
        for k, v in value.items():
            out[k], more = _patch(v, paths, label, str(k))
            used += more
        return out, used
    if isinstance(value, list):
        items = [_patch(v, paths, label, key) for v in value]
        return [v for v, _ in items], [n for _, names in items for n in names]
    if not isinstance(value, str):
        return value, []
    name = value.split("+")[0].split("@")[0]
    if name not in paths or value.count("+") > 1 or value.count("@") > 1:
        return value, []
    new = paths[name] + value[len(name):]
    if key not in REFERENCE_KEYS:
        raise RecipeError(f"{label}: `{key}: {value}` names stage `{name}`; mergekit-multi replaces "
                          f"every such value with the stage's path ({new}): rename the stage")
    return new, [name]


def _references(value: Any, key: str = "") -> Iterable[str]:
    """Every model reference of a recipe (strings under `model` / `base_model`)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _references(v, str(k))
    elif isinstance(value, list):
        for v in value:
            yield from _references(v, key)
    elif isinstance(value, str) and key in ("model", "base_model"):
        yield value


def _needs_by_path(data: dict, paths: Mapping[str, str], intermediate_dir: str, label: str) -> list[str]:
    """Stages a recipe reads by their path, and references to stages that do not exist: a
    folder of the intermediate directory no stage writes, or a bare word that is no stage,
    no folder and no hub id (org/name)."""
    by_path = {os.path.normpath(p): name for name, p in paths.items()}
    top = os.path.normpath(intermediate_dir)
    known = ", ".join(paths) or "none"
    needs = []
    for ref in _references(data):
        path = os.path.normpath(ref.split("+")[0].split("@")[0])
        if path in by_path:
            needs.append(by_path[path])
        elif os.path.dirname(path) == top and not os.path.isdir(path):
            raise RecipeError(f"{label}: model `{ref}` is a folder of the intermediate directory "
                              f"{intermediate_dir} that no stage writes (stages: {known})")
        elif "/" not in ref and "\\" not in ref and not os.path.isdir(path):
            raise RecipeError(f"{label}: model `{ref}` is no stage of this file (stages: {known}), "
                              "no folder, and no hub id (org/name)")
    return needs


def _final(stages: Mapping[str | None, Stage]) -> str | None:
    """The stage the file produces: the unnamed one, else the one stage no other reads."""
    if None in stages:
        return None
    read = {n for s in stages.values() for n in s.needs}
    sinks = [n for n in stages if n not in read]
    if len(sinks) != 1:
        raise RecipeError(f"every stage has a `name:` and {len(sinks)} of them are read by no other "
                          f"({', '.join(map(str, sinks)) or 'a cycle'}); leave `name:` out of the "
                          "final stage")
    return sinks[0]


def _run_order(stages: Mapping[str | None, Stage]) -> list[str | None]:
    """Depth first in document order, each stage after what it reads; a cycle is refused."""
    order: list[str | None] = []
    visiting: list[str | None] = []

    def visit(name: str | None) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = visiting[visiting.index(name):] + [name]
            raise RecipeError(f"{stages[name].label}: the stages read each other in a cycle: "
                              f"{' -> '.join(map(str, cycle))} (mergekit: Circular dependency "
                              f"detected involving {name})")
        visiting.append(name)
        for dep in stages[name].needs:
            visit(dep)
        visiting.pop()
        order.append(name)

    for name in stages:
        visit(name)
    return order


def stage_recipe(stage: Stage, version: str | None = None) -> Recipe:
    """The stage's recipe, checked as a plain recipe is; errors name the stage."""
    try:
        return parse_recipe(dump_recipe(stage.data), version=version)
    except RemergeError as err:
        raise type(err)(f"{stage.label}: {err}") from None


# --- mergekit_config.yml -------------------------------------------------------------------


class _ConfigDumper(yaml.Dumper):
    """mergekit's YAML dumper: lists of numbers in flow style (`[0, 3]`), other lists block."""


_ConfigDumper.add_representer(list, lambda d, data: d.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=all(isinstance(e, (int, float)) for e in data)))


def stage_config_yaml(data: Mapping[str, Any], layers: Mapping[str, int]) -> str:
    """A stage's mergekit_config.yml (and the card's YAML) as mergekit-multi 0.1.5 writes it:
    the config its planner normalized, as `MergeConfiguration.to_yaml()` dumps it. `data` is the
    stage's recipe with stage paths in; `layers`: {reference: layer count} of its models."""
    if "slices" in data:
        slices = [_slice(s) for s in data["slices"]]
    else:
        listed = [e["model"] for e in data["models"]]
        sources = [_source({"model": e["model"], "layer_range": [0, layers[e["model"]]],
                            "parameters": e.get("parameters")}) for e in data["models"]]
        base = data.get("base_model")
        if base and base not in listed:  # mergekit appends the base, without parameters
            sources.append(_source({"model": base, "layer_range": [0, layers[base]]}))
        slices = [{"sources": sources}]
    config = _set({k: data.get(k) for k in CONFIG_KEYS})
    config["modules"] = {MODULE: {"slices": slices}}
    if "parameters" in config:
        config["parameters"] = _parameters(config["parameters"])
    return yaml.dump(config, Dumper=_ConfigDumper).rstrip()


def _set(d: Mapping[str, Any]) -> dict:
    """pydantic's exclude_defaults for fields that default to None."""
    return {k: v for k, v in d.items() if v is not None}


def _slice(s: Mapping[str, Any]) -> dict:
    out = _set({"sources": [_source(x) for x in s["sources"]], "base_model": s.get("base_model"),
                "residual_weight": s.get("residual_weight"), "parameters": s.get("parameters")})
    if "residual_weight" in out:
        out["residual_weight"] = float(out["residual_weight"])  # Optional[float]
    if "parameters" in out:
        out["parameters"] = _parameters(out["parameters"])
    return out


def _source(x: Mapping[str, Any]) -> dict:
    out = _set({"model": x["model"], "layer_range": [int(v) for v in x["layer_range"]],
                "parameters": x.get("parameters")})
    if "parameters" in out:
        out["parameters"] = _parameters(out["parameters"])
    return out


def _parameters(p: Mapping[str, Any]) -> dict:
    return {k: _setting(v) for k, v in p.items()}


def _setting(v: Any) -> Any:
    """A parameter setting as pydantic dumps it: a {filter, value} entry loses an unset filter."""
    if isinstance(v, dict):
        return _set({"value": _setting(v.get("value")), "filter": v.get("filter")})
    if isinstance(v, list):
        return [_setting(e) for e in v]
    return v


def layer_counts(refs: Iterable[str], folders: Mapping[str, str | Path]) -> dict[str, int]:
    """{reference: its layer count}, from config.json as the architecture names the key."""
    import json

    from remerge.merge.architecture import architecture_of

    out = {}
    for ref in refs:
        config = json.loads((Path(folders[ref]) / "config.json").read_text(encoding="utf-8"))
        out[ref] = int(config[architecture_of(ref, config).layers_key])
    return out


# --- running --------------------------------------------------------------------------------


def is_current(folder: Path, config_yaml: str) -> bool:
    """A finished stage folder (config.json and a weight file, as mergekit-multi's --lazy asks)
    made from this very config."""
    recipe = folder / "mergekit_config.yml"
    return ((folder / "config.json").is_file() and any((folder / f).is_file() for f in WEIGHT_FILES)
            and recipe.is_file() and recipe.read_text(encoding="utf-8") == config_yaml)
