"""A published merge's recipe, recovered: a given file, else the published
`mergekit_config.yml`, else the first YAML block of its README card that parses as a recipe
(cards scraped as text sometimes lose their line breaks: such a block is rebuilt from
mergekit's recipe grammar)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from remerge.errors import AuditError

_YAML_BLOCK = re.compile(r"```ya?ml\s*\n(.*?)```", re.S)
_FLAT_BLOCK = re.compile(r"```ya?ml\s+(.*?)```", re.S)
_TOKEN = re.compile(r'"[^"]*"|\'[^\']*\'|\[[^\]]*\]|\{[^}]*\}|\S+')
TOP_KEYS = ("models", "merge_method", "base_model", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "slices", "chat_template")


def _is_recipe(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data and ("models" in data or "slices" in data)


def recipe_from_card(text: str) -> str | None:
    """The first YAML code block of a card that parses as a recipe (`models` + `merge_method`).

    Cards scraped as text sometimes lose their line breaks (the seed's reference copy has
    none); such a block is rebuilt from mergekit's recipe grammar."""
    for block in _YAML_BLOCK.findall(text):
        try:
            data = yaml.safe_load(block)
        except yaml.YAMLError:
            continue
        if _is_recipe(data):
            return block
    for block in _FLAT_BLOCK.findall(text):
        data = unflatten_recipe(block)
        if _is_recipe(data):
            return yaml.safe_dump(data, sort_keys=False)
    return None


def _scalar(token: str) -> Any:
    return yaml.safe_load(token)


def unflatten_recipe(flat: str) -> dict[str, Any] | None:
    """A recipe from YAML whose line breaks were lost (`models: - model: "a" parameters: ...`).

    Top-level keys are mergekit's; within `models`, each `-` starts an entry with `model:` and
    `parameters:` holding `name: value` pairs. Returns None when the text does not fit."""
    tokens = _TOKEN.findall(flat)
    data: dict[str, Any] = {}
    target: dict[str, Any] | None = None  # where `name: value` pairs go
    entry: dict[str, Any] | None = None
    i = 0
    try:
        while i < len(tokens):
            tok = tokens[i]
            if tok == "-":
                entry = {}
                data.setdefault("models", []).append(entry)
                target, i = entry, i + 1
                continue
            if not tok.endswith(":"):
                return None
            key = tok[:-1]
            in_entry_params = entry is not None and key == "parameters" and "parameters" not in entry
            if in_entry_params:
                target = entry["parameters"] = {}
                i += 1
            elif key in TOP_KEYS:
                entry = None
                if key in ("models", "parameters", "slices"):
                    data[key] = [] if key != "parameters" else {}
                    target = data[key] if key == "parameters" else None
                    i += 1
                else:
                    data[key], target, i = _scalar(tokens[i + 1]), None, i + 2
            elif target is not None:
                target[key], i = _scalar(tokens[i + 1]), i + 2
            else:
                return None
    except (IndexError, yaml.YAMLError):
        return None
    return data


def find_recipe(published: Path, recipe_file: str | Path | None = None) -> tuple[str, str]:
    """(recipe text, where it came from)."""
    if recipe_file is not None:
        try:
            return Path(recipe_file).read_text(encoding="utf-8"), str(recipe_file)
        except (OSError, UnicodeDecodeError) as err:
            raise AuditError(f"cannot read recipe {recipe_file}: {getattr(err, 'strerror', None) or err}") from None
    config = published / "mergekit_config.yml"
    if config.is_file():
        return config.read_text(encoding="utf-8"), "mergekit_config.yml"
    card = published / "README.md"
    if card.is_file():
        text = recipe_from_card(card.read_text(encoding="utf-8"))
        if text is not None:
            return text, "README.md"
    raise AuditError(
        f"{published}: no recipe found (no mergekit_config.yml, and no YAML recipe block in "
        "README.md); give one with --recipe FILE, or estimate one from the weights with "
        "--infer --candidate MODEL (once per possible parent)"
    )
