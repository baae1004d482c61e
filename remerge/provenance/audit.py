"""Audit a published merge: is it really what its recipe says?

1. Recover the recipe (`remerge.provenance.recovery`): a given file, the published
   `mergekit_config.yml`, or the YAML block of its README card.
2. Map the recipe's model references (often the author's local paths) to models we can read:
   an explicit `FROM=TO` map (a reference or a folder prefix above several), else the last
   two path parts as a hub id.
3. Follow the mergekit release recorded in the published index (`remerge.merge.releases`),
   plan the merge from the inputs' headers, and compute every tensor with the same function a
   merge uses (`remerge.merge.tensor.merge_tensor`), one at a time, comparing its bytes with
   the published tensor's; compare the json files key by key with what the recipe (and an
   optional config transplant) produces (`remerge.provenance.compare`).

   Tensors a random method drew (DARE, DELLA; mergekit's seed is rarely known) are checked
   element by element instead (`remerge.provenance.elementwise`): every element one of the
   values the recipe allows, and each model's kept share consistent with its density.

Verdicts: "bit-identical", "same tensors, different config files", "different tensors", and
for random methods "consistent with the recipe (random method, checked element by element)"
or "inconsistent". The report says what each rests on (`basis`).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

from remerge.errors import AuditError
from remerge.io.files import write_json_atomic, write_text_atomic
from remerge.io.layout import INDEX_NAME
from remerge.provenance import elementwise
from remerge.provenance.compare import compare_json_files, compare_tensors, load_json
from remerge.provenance.recovery import find_recipe

log = logging.getLogger(__name__)

FORMAT = "remerge.audit/1"
BIT_IDENTICAL = "bit-identical"
CONSISTENT = elementwise.CONSISTENT  # random methods, element by element
INCONSISTENT = elementwise.INCONSISTENT
CONFIGS_DIFFER = "same tensors, different config files"
TENSORS_DIFFER = "different tensors"


# --- the inputs ----------------------------------------------------------------------------


def default_mapping(ref: str) -> str:
    """The author's local path -> a hub id from its last two parts (.../org/name -> org/name)."""
    parts = [p for p in ref.replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if len(parts) >= 2 else ref


def _path_key(ref: str) -> str:
    """A reference as path maps compare it: Windows separators as '/', no trailing '/'."""
    key = ref.replace("\\", "/")
    return key.rstrip("/") or key


def _prefix_match(ref: str, path_map: Mapping[str, str]) -> tuple[str, str] | None:
    """(FROM, what to read) for the longest FROM of the map that is `ref` itself or a folder
    above it (whole path parts only: `/data/org` covers `/data/org/x`, not `/data/org2/x`)."""
    key = _path_key(ref)
    best = None
    for src, dst in path_map.items():
        prefix = _path_key(src)
        if key == prefix:
            rest = ""
        elif key.startswith(prefix.rstrip("/") + "/"):
            rest = key[len(prefix.rstrip("/")) + 1:]
        else:
            continue
        if best is None or len(prefix) > len(_path_key(best[0])):
            target = dst.replace("\\", "/").rstrip("/") + "/" + rest if rest else dst
            best = (src, target)
    return best


def resolve_references(refs: list[str], path_map: Mapping[str, str],
                       exists: Callable[[str], bool] = lambda r: Path(r).is_dir()
                       ) -> dict[str, dict[str, str]]:
    """{reference in the recipe: {"read": what to read instead, "how": why}}, in this order:
    the map (FROM is a reference or a folder prefix; the longest match wins; '\\' and '/' are
    the same separator), an existing folder as is, a local-looking path by its last two parts
    as a hub id, anything else (a hub id) unchanged."""
    out = {}
    for ref in refs:
        match = _prefix_match(ref, path_map)
        if match is not None:
            src, target = match
            how = "mapped" if _path_key(src) == _path_key(ref) else "mapped by folder prefix"
            out[ref] = {"read": target, "how": f"{how} {src}={path_map[src]}"}
        elif exists(ref):
            out[ref] = {"read": ref, "how": "an existing folder"}
        elif ref.startswith(("/", "~", ".")) or ref.count("/") > 1 or "\\" in ref:
            out[ref] = {"read": default_mapping(ref),
                        "how": "a local path, read as the hub id of its last two parts"}
        else:
            out[ref] = {"read": ref, "how": "a hub id"}
    return out


def map_references(refs: list[str], path_map: Mapping[str, str],
                   exists: Callable[[str], bool] = lambda r: Path(r).is_dir()) -> dict[str, str]:
    """{reference in the recipe: what to read instead} (see `resolve_references`)."""
    return {ref: r["read"] for ref, r in resolve_references(refs, path_map, exists).items()}


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


def verdict(tensors: Mapping[str, Any], files: Mapping[str, Any],
            checks: Mapping[str, Any] | None = None) -> str:
    """The tensors first (bytes, then the element-by-element checks of random draws), then
    the json files."""
    if tensors["differing"] or tensors["missing"] or tensors["extra"]:
        return TENSORS_DIFFER
    if checks is not None:
        return checks["verdict"]  # consistent or inconsistent; files are reported apart
    if files["differing"] or files["missing"] or files["extra"]:
        return CONFIGS_DIFFER
    return BIT_IDENTICAL


def _check_drawn(tasks, models, theirs, tensors: dict[str, Any]):
    """Element-by-element checks of the tensors a random method drew (a tensor the published
    model lacks is listed as missing)."""
    from remerge.merge.tensor import TensorInputs

    for task in tasks:
        if not theirs.has(task.name):
            tensors["missing"].append(task.name)
            continue
        tensors["compared_elementwise"] = tensors.get("compared_elementwise", 0) + 1
        yield elementwise.check_tensor(task, TensorInputs(task, models), theirs.load(task.name))


# --- the report ----------------------------------------------------------------------------


def semantics_line(report: Mapping[str, Any]) -> str:
    """Whether the followed release's semantics were verified against the real mergekit."""
    from remerge.merge.releases import RELEASES

    version = report["mergekit_semantics"]
    if report.get("semantics_verified", True):
        return (f"- semantics verified: yes (remerge's record of mergekit {version} was checked "
                "against that release's own outputs)")
    why = (f"remerge's record of mergekit {version} was read from mergekit's history, not run"
           if not RELEASES[version].verified else
           "the merge's own release has no record; the nearest one was followed")
    return f"- semantics verified: **no** ({why}: tensors and files may differ for that reason alone)"


def report_markdown(report: Mapping[str, Any]) -> str:
    t, f = report["tensors"], report["files"]
    lines = [
        f"# Audit of {report['published']['reference']}", "",
        f"**Verdict: {report['verdict']}**", "",
        f"- resting on: {report.get('basis', basis(report))}",
        f"- recipe: from {report['recipe']['source']}, merge method {report['recipe']['merge_method']}",
        f"- followed mergekit {report['mergekit_semantics']} ({report['version_source']})",
        semantics_line(report),
        "- models read:",
        *[f"  - `{k}` -> `{v['read']}` ({v['how']})" for k, v in report["recipe"]["resolution"].items()],
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
    if report.get("elementwise") is not None:
        lines += elementwise_markdown(report["elementwise"])
    if "inference" in report:
        lines += inference_markdown(report["inference"], report["verdict"])
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


def elementwise_markdown(checks: Mapping[str, Any]) -> list[str]:
    lines = ["## Random draws, element by element", "",
             f"{checks['tensors']} tensors drawn at random were checked: every element must be one of "
             "the values the recipe allows (one per subset of kept task-vector entries), and each "
             f"model's kept share must fit its density (p below {checks['threshold']['per_test']:.3g} per "
             f"test fails: {checks['threshold']['alpha']:g} over {checks['threshold']['tests']} tests).", ""]
    for ref, m in (checks.get("models") or {}).items():
        share = m.get("kept_share")
        lines.append(f"- `{ref}`: " + (f"kept {share:.1%} of {m.get('tested', 0)} testable entries, "
                                        f"density {m.get('expected_share', 0):.1%}, p = {m.get('p_value', 1):.3g}"
                                        if share is not None else "no testable entry"))
    if checks["problems"]:
        lines += ["", "Problems:", "", *[f"- {p}" for p in checks["problems"][:50]]]
    return lines + [""]


def inference_markdown(inference: Mapping[str, Any], verdict_text: str) -> list[str]:
    best = inference["best"]
    outcome = ("it reproduces every tensor" if verdict_text != TENSORS_DIFFER else
               "no estimate reproduced every tensor: this is the closest")
    lines = ["## Inferred recipe", "",
             f"Estimated from the weights ({inference['estimates_tried']} candidate recipes tried on "
             f"{len(inference['samples'])} sample tensors; {outcome}). Method {best['method']}: "
             f"{best['why']}.", "", "```yaml", best["recipe"].rstrip(), "```", ""]
    if best.get("layers"):
        lines += [f"Output layers come from: {', '.join(best['layers'])}", ""]
    return lines


def write_reports(report: Mapping[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "audit.json", report)
    write_text_atomic(out / "audit.md", report_markdown(report))


# --- the whole audit -----------------------------------------------------------------------


def expected_json(recipe, folders: Mapping[str, Path], transplant_from: Path | None) -> dict[str, Any]:
    """The json files the recipe produces: mergekit's config.json and the donor's tokenizer
    json files, then (with a transplant) every .json of the transplant donor but the index."""
    import tempfile

    from remerge.merge.model_files import donor, merged_config, tokenizer_files, transplant_files
    from remerge.merge.tokenizer import write_tokenizer_files, writes_tokenizer

    base = Path(folders[donor(recipe)])
    if writes_tokenizer(recipe):  # written by transformers, as mergekit writes them
        with tempfile.TemporaryDirectory(prefix="remerge-audit-tokenizer-") as tmp:
            names, vocab_size = write_tokenizer_files(recipe, folders, Path(tmp))
            files = {name: load_json(Path(tmp) / name) for name in names if name.endswith(".json")}
        files["config.json"] = merged_config(recipe, base, vocab_size)
    else:
        files = {"config.json": merged_config(recipe, base)}
        for name in tokenizer_files(recipe, base):
            if name.endswith(".json"):
                files[name] = load_json(base / name)
    if transplant_from is not None:
        for name in transplant_files(transplant_from):
            files[name] = load_json(transplant_from / name)
    return files


def _transplant_target(donor: str, path_map: Mapping[str, str]) -> str:
    """The transplant donor as the map resolves it (a reference, a prefix, or as given)."""
    match = _prefix_match(donor, path_map)
    return match[1] if match else donor


def audit_model(
    published: Path, recipe_text: str, recipe_source: str, path_map: Mapping[str, str],
    resolve: Callable[[str], Path], version: str | None = None,
    transplant_from: str | None = None, published_reference: str | None = None,
) -> dict[str, Any]:
    """Re-merge the recipe tensor by tensor (in memory) and compare with `published`."""
    from remerge.io.safetensors import ModelFolder
    from remerge.merge.plan import plan_merge
    from remerge.merge.recipe import parse_recipe
    from remerge.merge.releases import release_of_published, verified_for
    from remerge.merge.tensor import merge_tensor, plan_tensor

    published = Path(published)
    recorded = recorded_version(published)
    # a recorded "" or "banana" is refused (release_of_published), never taken for "none"
    chosen = version or (release_of_published(recorded).version if recorded is not None else None)
    source = "given" if version else ("default" if recorded is None else
                                      "recorded in the published index" if chosen == recorded else
                                      f"the index records {recorded}, which remerge has no record "
                                      "of: the nearest release")
    original = parse_recipe(recipe_text, version=chosen)
    resolved = resolve_references(list(original.inputs), path_map)
    mapping = {ref: r["read"] for ref, r in resolved.items()}
    recipe = original.with_references(mapping)
    folders = {ref: resolve(ref) for ref in recipe.inputs}
    donor_dir = resolve(_transplant_target(transplant_from, path_map)) if transplant_from else None
    plan = plan_merge(recipe, folders)
    models = plan.open_models()
    theirs = ModelFolder(published, label=published_reference or str(published))
    tasks = [plan_tensor(recipe, t) for t in plan.tensors.values()]
    # random draws (DARE, DELLA...): mergekit's seed is unknown, so those tensors are checked
    # element by element against the values the recipe allows; every other one byte for byte
    drawn = [t for t in tasks if elementwise.needs_check(t)]
    exact = [t for t in tasks if not elementwise.needs_check(t)]
    # the pool runs the per-model sorts of sparsifying methods, as in a merge's shard job
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        tensors = compare_tensors(((task, merge_tensor(task, models, pool)) for task in exact), theirs,
                                  checked_apart=[t.name for t in drawn])
    checks = None
    if drawn:
        checks = elementwise.summarize(_check_drawn(drawn, models, theirs, tensors))
    files = compare_json_files(expected_json(recipe, folders, donor_dir), published,
                               {ref: Path(f) for ref, f in folders.items()})
    return {
        "format": FORMAT,
        "published": {"reference": published_reference or str(published), "path": str(published)},
        "verdict": verdict(tensors, files, checks),
        "elementwise": checks,
        "recipe": {"source": recipe_source, "text": recipe_text, "merge_method": recipe.method.name,
                   "references": mapping, "resolution": resolved,
                   "transplant_from": transplant_from},
        "mergekit_semantics": recipe.release.version,
        "version_source": source,
        # the followed record was checked against that very release's outputs (releases.py)
        "semantics_verified": verified_for(recipe.release, None if version else recorded),
        "tensors": tensors,
        "files": files,
    }


def infer_from_weights(published: Path, candidates: list[str], base: str | None,
                       path_map: Mapping[str, str], resolve: Callable[[str], Path],
                       version: str | None) -> dict[str, Any]:
    """Estimate the recipe from the published weights and the candidate parents (named as
    the user named them; read through the path map), see `remerge.provenance.infer`."""
    from remerge.provenance.infer import infer_recipe

    if not candidates:
        raise AuditError("--infer needs the models the merge may come from: --candidate MODEL "
                         "(once per model; a folder or a hub id)")
    if base is not None and base not in candidates:
        candidates = [*candidates, base]
    resolved = resolve_references(candidates, path_map)
    folders = {ref: Path(resolve(r["read"])) for ref, r in resolved.items()}
    from remerge.merge.releases import release_of_published

    recorded = recorded_version(published)
    follow = version or (release_of_published(recorded).version if recorded is not None else None)
    return infer_recipe(published, folders, base=base, version=follow)


def basis(report: Mapping[str, Any]) -> str:
    """What the verdict rests on, in words."""
    how = "an inferred recipe (from the weights), re-merged" if "inference" in report else "the recipe, re-merged"
    if report.get("elementwise") is not None:
        return f"{how}; a random method, so checked element by element against the values it allows"
    if report["verdict"] == TENSORS_DIFFER:
        return f"{how}: tensors compared byte for byte"
    return f"{how}: every tensor bit-identical"


def run_audit(published: str, recipe_file: str | None, path_map: Mapping[str, str],
              transplant_from: str | None, version: str | None, models_dir: str | Path | None,
              out_dir: str | Path, infer: bool = False, candidates: list[str] | None = None,
              base: str | None = None) -> dict[str, Any]:
    """The audit as a function of paths (the workflow's job, `remerge audit`): find the
    published model and its recipe (or, with `infer` or when it has none and candidates are
    given, estimate one from the weights), audit, write audit.json and audit.md into
    `out_dir`. Whatever the verdict, the reports are the result."""
    from remerge.hub.references import resolve_reference

    models = Path(models_dir) if models_dir is not None else None
    resolve = lambda ref: resolve_reference(ref, models)  # noqa: E731
    folder = published_folder(published, models)
    inference = None
    if not infer:
        try:
            text, source = find_recipe(folder, recipe_file)
        except AuditError:
            if not candidates:
                raise
            infer = True
            log.warning("%s has no recipe: inferring one from the weights", published)
    if infer:
        inference = infer_from_weights(folder, list(candidates or ()), base, path_map, resolve, version)
        text, source = inference["best"]["recipe"], "inferred from the weights (--infer)"
    report = audit_model(folder, text, source, path_map, resolve=resolve,
                         version=version, transplant_from=transplant_from,
                         published_reference=published)
    if inference is not None:
        report["inference"] = inference
    report["basis"] = basis(report)
    write_reports(report, out_dir)
    log.info("verdict: %s (see %s)", report["verdict"], Path(out_dir) / "audit.md")
    return report
