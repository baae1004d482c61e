"""provenance.json: everything that explains one merged model, machine-readable.

Every input's repository, revision, resolved commit and files' sha256; the recipe and the
mergekit release followed; the sha256 of every output tensor and one digest over them; the
config files and where each came from; the scores; the software versions. No timestamps: two
runs of the same merge give identical records.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from typing import Any, Mapping, Sequence

from remerge import __version__
from remerge.merge.recipe import Recipe

FORMAT = "remerge.provenance/1"
SOFTWARE = ("torch", "safetensors", "transformers", "huggingface_hub", "lm_eval", "snakemake")


def software_versions() -> dict[str, str]:
    versions = {"remerge": __version__, "python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def tensors_digest(digests: Mapping[str, str]) -> str:
    """One digest of a model's tensors: sha256 over `name\\0sha256\\n` lines in name order.

    Independent of how the tensors are cut into shards and of the files' headers."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()


def input_record(reference: str, name: str | None, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """One input model's provenance: where it came from and its files' sha256."""
    return {
        "reference": reference,
        "name": name,
        "source": manifest["source"],
        "repo_id": manifest.get("repo_id"),
        "requested_revision": manifest.get("requested_revision"),
        "commit": manifest.get("commit"),
        "files": manifest["files"],
    }


def stage_chain(stages: Mapping[str, tuple[Mapping[str, Any], str]]) -> list[dict[str, Any]]:
    """The earlier stages of a chain of merges, first first, from the provenance records of the
    merges whose outputs this merge reads ({reference: (provenance.json, its sha256)}): each
    one's own chain, then itself, once each."""
    chain: dict[str, dict[str, Any]] = {}
    for reference, (prov, sha256) in stages.items():
        for stage in prov.get("chain", []):
            chain.setdefault(stage["name"], stage)
        chain.setdefault(prov["name"], {
            "name": prov["name"],
            "reference": reference,  # how the later stage's recipe names its output folder
            "merge_method": prov["merge_method"],
            "mergekit_semantics": prov["mergekit_semantics"],
            "inputs": [rec["reference"] for rec in prov["inputs"]],
            "tensors_digest": prov["output"]["tensors_digest"],
            "provenance_sha256": sha256,
        })
    return list(chain.values())


def provenance(
    *, name: str, recipe: Recipe, inputs: Sequence[Mapping[str, Any]], tensors: Mapping[str, Any],
    configs: Mapping[str, Any], scores: Mapping[str, Any] | None, grid_point: Mapping[str, str],
    chain: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The record of one merged model; `chain`: the earlier stages of a chain of merges
    (`stage_chain`), empty for a merge of models."""
    return {
        "format": FORMAT,
        "name": name,
        "grid_point": dict(grid_point),
        "recipe": recipe.text,
        "merge_method": recipe.method.name,
        "mergekit_semantics": recipe.release.version,
        "inputs": list(inputs),
        "output": {
            "tensors_digest": tensors["digest"],
            "total_size": tensors["total_size"],
            "shards": tensors["shards"],
            "tensors": tensors["tensors"],
        },
        "configs": dict(configs),
        "chain": [dict(stage) for stage in chain],
        "scores": scores,
        "software": software_versions(),
    }
