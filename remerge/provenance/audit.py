"""Audit a published merge: is it really what its recipe says?

1. Recover the recipe: a given file, else the published `mergekit_config.yml`, else the YAML
   block of its README card (the seed's card holds only that).
2. Map the recipe's model references (often the author's local paths) to models we can read:
   an explicit `FROM=TO` map, else the last two path parts as a hub id.
3. Re-merge every tensor in memory, one at a time, following the mergekit version recorded in
   the published index, and compare it bit for bit with the published tensor; compare the
   json files key by key with what the recipe (and an optional config transplant) produces.

Verdicts: "bit-identical", "same tensors, different config files", "different tensors".
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml

from remerge.errors import AuditError
from remerge.io.files import write_json_atomic, write_text_atomic
from remerge.io.layout import INDEX_NAME

log = logging.getLogger(__name__)

BIT_IDENTICAL = "bit-identical"
CONFIGS_DIFFER = "same tensors, different config files"
TENSORS_DIFFER = "different tensors"
_YAML_BLOCK = re.compile(r"```ya?ml\s*\n(.*?)```", re.S)


# --- the recipe ----------------------------------------------------------------------------


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
        return Path(recipe_file).read_text(encoding="utf-8"), str(recipe_file)
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
        "README.md); give one with --recipe FILE"
    )


def default_mapping(ref: str) -> str:
    """The author's local path -> a hub id from its last two parts (.../org/name -> org/name)."""
    parts = [p for p in ref.replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if len(parts) >= 2 else ref


def map_references(refs: list[str], path_map: Mapping[str, str],
                   exists: Callable[[str], bool] = lambda r: Path(r).is_dir()) -> dict[str, str]:
    """{reference in the recipe: what to read instead}: the map first, an existing folder as
    is, a local-looking path by its last two parts, anything else (a hub id) unchanged."""
    out = {}
    for ref in refs:
        if ref in path_map:
            out[ref] = path_map[ref]
        elif exists(ref):
            out[ref] = ref
        elif ref.startswith(("/", "~", ".")) or ref.count("/") > 1 or "\\" in ref:
            out[ref] = default_mapping(ref)
        else:
            out[ref] = ref
    return out


CARD_FILES = ("README.md", "*.yml", "*.yaml")


def published_folder(ref: str, models_dir: Path | None) -> Path:
    """A published merge's folder: a local folder as is, a hub id downloaded with its card."""
    from remerge.hub.references import HUB_ID, resolve_reference

    if Path(ref).is_dir():
        return Path(ref)
    if not HUB_ID.match(ref):
        raise AuditError(f"published model {ref!r}: no such folder, and not a hub id org/name[@revision]")
    from remerge.hub.download import DEFAULT_ALLOW_PATTERNS

    return resolve_reference(ref, models_dir, allow_patterns=(*DEFAULT_ALLOW_PATTERNS, *CARD_FILES))


def recorded_version(published: Path) -> str | None:
    """The mergekit version in the published index's metadata, if any."""
    index = published / INDEX_NAME
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text())["metadata"].get("mergekit_version")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def semantics_for(recorded: str) -> str:
    """Whose arithmetic to follow for a recorded mergekit version: 0.0.x -> 0.0.5.1, else 0.1.5."""
    from remerge.merge.recipe import VERSIONS

    if recorded in VERSIONS:
        return recorded
    follow = "0.0.5.1" if recorded.startswith("0.0.") else "0.1.5"
    log.warning("published with mergekit %s: following %s's semantics", recorded, follow)
    return follow


# --- comparing tensors ---------------------------------------------------------------------


def ordered_bits(t):
    """Integers whose order and differences follow the floats' (for ulp distances):
    sign-magnitude bit patterns mapped to two's complement (+0 and -0 both 0)."""
    import torch

    width = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}[t.dtype]
    bits = t.contiguous().view(width).to(torch.int64)
    sign_bit = 1 << (8 * t.element_size() - 1)
    magnitude = bits & (sign_bit - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def _same_width_ints(t):
    import torch

    return t.contiguous().reshape(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                                            8: torch.int64}[t.element_size()])


def tensor_difference(ours, theirs) -> dict[str, Any] | None:
    """None when the bytes are equal; else counts, largest |difference| and largest ulp distance."""
    import torch

    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return {"dtype": [str(ours.dtype), str(theirs.dtype)],
                "shape": [list(ours.shape), list(theirs.shape)]}
    raw_a, raw_b = _same_width_ints(ours), _same_width_ints(theirs)
    if torch.equal(raw_a, raw_b):
        return None
    differ = raw_a != raw_b
    out: dict[str, Any] = {"elements": ours.numel(), "differing_elements": int(differ.sum())}
    if ours.is_floating_point():
        a, b = ours.reshape(-1), theirs.reshape(-1)
        out["max_abs_diff"] = float((a.double() - b.double()).abs()[differ].max())
        out["max_ulp"] = int((ordered_bits(a) - ordered_bits(b)).abs()[differ].max())
    return out


def compare_tensors(expected: Iterator[tuple[str, Any]], published) -> dict[str, Any]:
    """Compare (name, tensor) pairs computed from the recipe with the published folder's."""
    differing, identical, missing = [], 0, []
    seen = set()
    for name, ours in expected:
        seen.add(name)
        if not published.has(name):
            missing.append(name)
            continue
        diff = tensor_difference(ours, published.load(name))
        if diff is None:
            identical += 1
        else:
            differing.append({"name": name, **diff})
            log.info("tensor %s differs: %s", name, diff)
    extra = sorted(set(published.tensors) - seen)
    return {"compared": len(seen), "identical": identical, "differing": differing,
            "missing": missing, "extra": extra}


# --- comparing json files ------------------------------------------------------------------


# Keys that record the author's installation, not the model: reported, never a difference.
INSTALLATION_KEYS = ("_name_or_path", "transformers_version")


def json_diff(ours: Any, theirs: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Dotted keys whose values differ, with both values (absent -> null, marked).
    Top-level `INSTALLATION_KEYS` are left out."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(ours) | set(theirs), key=str):
            if not prefix and key in INSTALLATION_KEYS:
                continue
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in ours:
                out.append({"key": path, "expected": None, "published": theirs[key], "only_in": "published"})
            elif key not in theirs:
                out.append({"key": path, "expected": ours[key], "published": None, "only_in": "expected"})
            else:
                out += json_diff(ours[key], theirs[key], path)
        return out
    return [] if ours == theirs else [{"key": prefix or "(whole file)", "expected": ours, "published": theirs}]


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return {"__unreadable__": str(err)}


def compare_json_files(expected: Mapping[str, Any], published: Path,
                       inputs: Mapping[str, Path]) -> dict[str, Any]:
    """Compare expected json contents with the published .json files (index excluded).

    A differing file that equals an input model's file of the same name is explained as
    coming from that model (a config transplant)."""
    theirs = {p.name: p for p in published.glob("*.json") if p.name != INDEX_NAME}
    identical, differing = [], []
    for name in sorted(set(expected) & set(theirs)):
        keys = json_diff(expected[name], _load_json(theirs[name]))
        if not keys:
            identical.append(name)
            continue
        entry: dict[str, Any] = {"file": name, "keys": keys}
        for model, folder in inputs.items():
            if (folder / name).is_file() and _load_json(folder / name) == _load_json(theirs[name]):
                entry["matches"] = model
                break
        differing.append(entry)
    return {"identical": identical, "differing": differing,
            "missing": sorted(set(expected) - set(theirs)), "extra": sorted(set(theirs) - set(expected))}


def verdict(tensors: Mapping[str, Any], files: Mapping[str, Any]) -> str:
    if tensors["differing"] or tensors["missing"] or tensors["extra"]:
        return TENSORS_DIFFER
    if files["differing"] or files["missing"] or files["extra"]:
        return CONFIGS_DIFFER
    return BIT_IDENTICAL


# --- the report ----------------------------------------------------------------------------


def report_markdown(report: Mapping[str, Any]) -> str:
    t, f = report["tensors"], report["files"]
    lines = [
        f"# Audit of {report['published']['reference']}", "",
        f"**Verdict: {report['verdict']}**", "",
        f"- recipe: from {report['recipe']['source']}, merge method {report['recipe']['merge_method']}",
        f"- followed mergekit {report['mergekit_semantics']} ({report['version_source']})",
        "- models read:",
        *[f"  - `{k}` -> `{v}`" for k, v in report["recipe"]["references"].items()],
        f"- tensors: {t['compared']} compared, {t['identical']} bit-identical, "
        f"{len(t['differing'])} different, {len(t['missing'])} missing, {len(t['extra'])} extra", "",
    ]
    if t["differing"]:
        lines += ["## Differing tensors", "", "|tensor|differing elements|max abs diff|max ulp|",
                  "|---|---:|---:|---:|"]
        for d in t["differing"]:
            if "dtype" in d:
                lines.append(f"|{d['name']}|dtype {d['dtype']} / shape {d['shape']}|||")
            else:
                lines.append(f"|{d['name']}|{d['differing_elements']} of {d['elements']}|"
                             f"{d.get('max_abs_diff', 0):.6g}|{d.get('max_ulp', '-')}|")
        lines.append("")
    for title, key in (("Missing tensors (the recipe makes them, the published model lacks them)", "missing"),
                       ("Extra tensors (published, not made by the recipe)", "extra")):
        if t[key]:
            lines += [f"## {title}", "", *[f"- {n}" for n in t[key]], ""]
    lines += ["## Files", "", f"- identical: {', '.join(f['identical']) or 'none'}"]
    for d in f["differing"]:
        why = f" (equals {d['matches']}'s file: a config transplant)" if d.get("matches") else ""
        keys = ", ".join(k["key"] for k in d["keys"][:20])
        lines.append(f"- **{d['file']}** differs{why}: {keys}")
    if f["missing"]:
        lines.append(f"- missing from the published model: {', '.join(f['missing'])}")
    if f["extra"]:
        lines.append(f"- only in the published model: {', '.join(f['extra'])}")
    return "\n".join(lines) + "\n"


def write_reports(report: Mapping[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "audit.json", report)
    write_text_atomic(out / "audit.md", report_markdown(report))


# --- the whole audit -----------------------------------------------------------------------


def expected_json(recipe, folders: Mapping[str, Path], transplant_from: Path | None) -> dict[str, Any]:
    """The json files the recipe produces: mergekit's config.json and the donor's tokenizer
    json files, then (with a transplant) every .json of the transplant donor but the index."""
    from remerge.merge.model_files import donor, merged_config, tokenizer_files, transplant_files

    base = Path(folders[donor(recipe)])
    files: dict[str, Any] = {"config.json": merged_config(recipe, base)}
    for name in tokenizer_files(recipe, base):
        if name.endswith(".json"):
            files[name] = _load_json(base / name)
    if transplant_from is not None:
        for name in transplant_files(transplant_from):
            files[name] = _load_json(transplant_from / name)
    return files


def audit_model(
    published: Path, recipe_text: str, recipe_source: str, path_map: Mapping[str, str],
    resolve: Callable[[str], Path], version: str | None = None,
    transplant_from: str | None = None, published_reference: str | None = None,
) -> dict[str, Any]:
    """Re-merge the recipe tensor by tensor (in memory) and compare with `published`."""
    from remerge.merge.engine import merge_tensor, plan_merge
    from remerge.merge.recipe import parse_recipe
    from remerge.io.safetensors import ModelFolder

    published = Path(published)
    recorded = recorded_version(published)
    chosen = version or (semantics_for(recorded) if recorded else None)
    source = "given" if version else ("recorded in the published index" if recorded else "default")
    original = parse_recipe(recipe_text, version=chosen)
    mapping = map_references(list(original.inputs), path_map)
    recipe = original.with_references(mapping)
    folders = {ref: resolve(ref) for ref in recipe.inputs}
    donor_dir = resolve(path_map.get(transplant_from, transplant_from)) if transplant_from else None
    plan = plan_merge(recipe, folders)
    models = {ref: ModelFolder(folders[ref], label=ref) for ref in recipe.inputs}
    theirs = ModelFolder(published, label=published_reference or str(published))
    expected = ((name, merge_tensor(recipe, t, models)) for name, t in plan.tensors.items())
    tensors = compare_tensors(expected, theirs)
    files = compare_json_files(expected_json(recipe, folders, donor_dir), published,
                               {ref: Path(f) for ref, f in folders.items()})
    return {
        "format": "remerge.audit/1",
        "published": {"reference": published_reference or str(published), "path": str(published)},
        "verdict": verdict(tensors, files),
        "recipe": {"source": recipe_source, "text": recipe_text, "merge_method": recipe.method.name,
                   "references": mapping, "transplant_from": transplant_from},
        "mergekit_semantics": recipe.version,
        "version_source": source,
        "tensors": tensors,
        "files": files,
    }
