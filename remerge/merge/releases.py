"""mergekit releases as data: one frozen record per release says how its bytes differ.

Published merges were made by many mergekit releases, and some recipes give different bytes
(or files) in each. Everything in remerge that depends on the release reads a field of the
`Release` the recipe carries; this table is the only place that knows version strings.

Each field names one behaviour that changed between releases. The values were read in the
installed source of each release and checked against its outputs (tests/parity/NOTES.md);
`verified` says whether the record was checked against the real release from PyPI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from remerge.errors import RecipeError

log = logging.getLogger(__name__)

SINGLE_SHARD = "model.safetensors"

TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"


@dataclass(frozen=True)
class IndexFormat:
    """How `model.safetensors.index.json` is written."""

    metadata_keys: tuple[str, ...]  # in the order written: "mergekit_version", "total_size"
    indent: int | None  # None: one line with Python's default separators
    lone_shard: bool  # also written when the model has a single shard


@dataclass(frozen=True)
class Release:
    """What one mergekit release does where releases differ."""

    version: str
    verified: bool  # checked against the real release, installed from PyPI in a side venv

    # recipes
    duplicate_inputs: str  # a model listed twice: "count_once" (first entry's parameters) | "refuse"

    # parameters
    task_arithmetic_lambda: bool  # `lambda` scales task arithmetic, TIES, DARE... (else ignored)
    gradient_t_after_layers: float  # layer position of tensors after the layers (norm, lm_head)

    # slices
    # the inputs of the tensors after the layers: the last slice's sources, "all" of them or
    # "first_slice_count": only as many as the first slice has (0.1.5 zips the last slice's
    # models with a list of the first slice's length)
    post_weight_sources: str
    # the order mergekit saves tensors in (which decides the shard cut and the index): by the
    # name each reads, ties broken as its scheduler breaks them: "task_index" (by the indices
    # of its task universe, explored through a set) | "reverse_plan" (the tensor planned last
    # first) (remerge.merge.schedule)
    save_ties: str
    writer_priority: int  # the priority of mergekit's tensor-writer task in that scheduler

    # which tensors, in which dtype
    missing_dtype: str  # no `dtype:`: "base" (inputs cast to the base's dtype) | "promote"
    lm_head_fallback: str  # a model without lm_head.weight: "embedding" (its embed_tokens) | "skip"
    shape_mismatch: str  # an input of another shape: "error" | "skip" (the model is left out)

    # arithmetic
    linear_accumulator: str  # linear: "compute" (in the compute dtype) | "float32"
    topk_at_least_one: bool  # magnitude pruning keeps max(1, int(density * n)) entries
    breadcrumbs_band: str  # "slice" ([n_bot:-n_top] of the ranking) | "target" (density's share)
    rescale: str  # "scale_then_mask": (delta * ratio) * mask when both L1 norms >= the minimum
    #               "mask_then_scale": (delta * mask) * ratio unless a norm is < the minimum
    rescale_min_norm: float
    dare_rescale: str  # "inverse_density" (kept / density) | "l1_ratio" (like the others)

    # files
    index: IndexFormat
    lone_shard_name: str  # the name of a single output shard
    tokenizer_files: tuple[str, ...]  # copied from the donor when present
    config_json: str  # "donor_keys_sorted" (transformers 4 era) | "transformers" (save_pretrained)
    # how the model card names a method: {method: text}; empty: "[pretty name](paper)"
    card_method_names: Mapping[str, str]
    # the merge methods whose arithmetic in this release remerge reproduces
    methods: frozenset[str]

    def shard_names(self, count: int) -> list[str]:
        """`model-0000i-of-0000K.safetensors` (1-based), or the release's lone-shard name."""
        if count == 1:
            return [self.lone_shard_name]
        return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


# the methods both releases compute alike, or whose differences the fields above describe
# (0.0.5.1 also has model_stock and passthrough, with 0.1.5's bytes on every parity recipe)
_GTA_AND_LINEAR = frozenset({"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                             "breadcrumbs", "breadcrumbs_ties"})
_TOKENIZER_0_0 = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                  "tokenizer.model")

RELEASES: dict[str, Release] = {
    r.version: r
    for r in (
        Release(
            version="0.0.5.1", verified=True,
            duplicate_inputs="count_once",
            task_arithmetic_lambda=False, gradient_t_after_layers=1.0,
            post_weight_sources="all", save_ties="reverse_plan", writer_priority=0,
            missing_dtype="base", lm_head_fallback="skip", shape_mismatch="skip",
            linear_accumulator="compute", topk_at_least_one=False, breadcrumbs_band="slice",
            rescale="scale_then_mask", rescale_min_norm=1e-8, dare_rescale="inverse_density",
            index=IndexFormat(("mergekit_version", "total_size"), indent=None, lone_shard=True),
            lone_shard_name="model-00001-of-00001.safetensors",
            tokenizer_files=_TOKENIZER_0_0,
            config_json="donor_keys_sorted",
            card_method_names=MappingProxyType({
                "linear": "[linear](https://arxiv.org/abs/2203.05482)",
                "ties": f"[TIES]({TIES_PAPER})",
                "task_arithmetic": "[task arithmetic](https://arxiv.org/abs/2212.04089)",
                "dare_ties": f"[DARE]({DARE_PAPER}) [TIES]({TIES_PAPER})",
                "dare_linear": f"linear [DARE]({DARE_PAPER})",
                "model_stock": "[Model Stock](https://arxiv.org/abs/2403.19522)",
            }),
            methods=_GTA_AND_LINEAR | {"model_stock", "passthrough"},
        ),
        Release(
            version="0.1.5", verified=True,
            duplicate_inputs="refuse",
            task_arithmetic_lambda=True, gradient_t_after_layers=0.0,
            post_weight_sources="first_slice_count", save_ties="task_index", writer_priority=10000,
            missing_dtype="promote", lm_head_fallback="embedding", shape_mismatch="error",
            linear_accumulator="float32", topk_at_least_one=True, breadcrumbs_band="target",
            rescale="mask_then_scale", rescale_min_norm=1e-7, dare_rescale="l1_ratio",
            index=IndexFormat(("total_size", "mergekit_version"), indent=2, lone_shard=False),
            lone_shard_name=SINGLE_SHARD,
            tokenizer_files=_TOKENIZER_0_0 + (
                "added_tokens.json", "merges.txt", "chat_template.jinja", "generation_config.json",
                "chat_template.json", "video_preprocessor_config.json"),
            config_json="transformers",
            card_method_names=MappingProxyType({}),
            methods=_GTA_AND_LINEAR | {
                "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce", "della",
                "della_linear", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough"},
        ),
    )
}
VERSIONS = tuple(RELEASES)
DEFAULT_VERSION = "0.1.5"


def get_release(version: str | None = None) -> Release:
    """The record of a release (the default one for None); unknown versions are refused."""
    version = DEFAULT_VERSION if version is None else str(version)
    if version not in RELEASES:
        raise RecipeError(f"mergekit version `{version}` is not supported "
                          f"(allowed: {', '.join(VERSIONS)})")
    return RELEASES[version]


def counting_duplicates_once() -> Release:
    """The newest release that still merged a recipe listing a model twice."""
    return [r for r in RELEASES.values() if r.duplicate_inputs == "count_once"][-1]


def release_of_published(recorded: str) -> Release:
    """Whose semantics to follow for the `mergekit_version` a published index records:
    the release itself when we have its record, else the nearest one of the same series."""
    if recorded in RELEASES:
        return RELEASES[recorded]
    follow = "0.0.5.1" if recorded.startswith("0.0.") else DEFAULT_VERSION
    log.warning("published with mergekit %s: following %s's semantics", recorded, follow)
    return RELEASES[follow]
