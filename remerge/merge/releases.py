"""mergekit releases as data: one frozen record per release says how its bytes differ.

Published merges were made by many mergekit releases, and some recipes give different bytes
(or files) in each. Everything in remerge that depends on the release reads a field of the
`Release` the recipe carries; this table is the only place that knows version strings.

Each field names one behaviour that changed between releases. The values of a `verified`
record were read in the installed source of the release from PyPI and checked against its
outputs on every parity recipe (tests/parity/NOTES.md); the others (releases PyPI lacks) rest
on dated copies of mergekit's source and its pull requests (NOTES.md § 23).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Mapping

from remerge.errors import AuditError, RecipeError

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
    # config.json as the release's transformers writes it: "donor_keys_sorted" (transformers
    # < 4.56: `torch_dtype`, `_name_or_path`) | "donor_keys_sorted_dtype" (4.56-4.57: `dtype`,
    # no `_name_or_path`) | "transformers" (5: save_pretrained itself) (merge.model_files)
    config_json: str
    # how the model card names a method: {method: text}; empty: "[pretty name](paper)"
    card_method_names: Mapping[str, str]
    # the merge methods whose arithmetic in this release remerge reproduces
    methods: frozenset[str]
    # `tokenizer_source`, `tokenizer:` and `chat_template` as this release does them
    # (remerge.merge.tokenizer); False: remerge refuses them there
    tokenizers: bool = False

    def shard_names(self, count: int) -> list[str]:
        """`model-0000i-of-0000K.safetensors` (1-based), or the release's lone-shard name."""
        if count == 1:
            return [self.lone_shard_name]
        return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


# the methods both releases compute alike, or whose differences the fields above describe
# (0.0.5.1 also has model_stock and passthrough, with 0.1.5's bytes on every parity recipe)
_GTA_AND_LINEAR = frozenset({"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                             "breadcrumbs", "breadcrumbs_ties"})
# methods 0.0.6 added with 0.1.5's bytes on every parity recipe (NuSLERP, PR #357; PR #495)
_NEW_IN_0_0_6 = frozenset({"nuslerp", "multislerp", "nearswap"})
_TOKENIZER_0_0 = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                  "tokenizer.model")
# 0.1.x before 0.1.5: two more files, still no generation_config.json or chat templates
_TOKENIZER_0_1 = _TOKENIZER_0_0 + ("added_tokens.json", "merges.txt")

# Not in any `methods` below, though those releases have them, because their arithmetic there
# is their own and remerge does not reproduce it (tests/parity/NOTES.md, mergekit releases):
# slerp up to 0.1.4 (numpy float32, whose reductions also round differently per CPU), della
# and della_linear in 0.0.x (its own rank and 1/p rescale), sce in 0.0.6 (Python-float
# weights), karcher in 0.1.3-0.1.4 (Python-float norms), consensus_ta/ties (0.0.6 only).

_V0_0_5_1 = Release(
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
)

# 0.0.6 = 0.0.5.1's arithmetic and files, plus: lm_head read from a model's embeddings when it
# has none (PR #464), the method registry's card names (0.1.5's texts), three new methods.
# Verified on all 121 parity recipes (transformers 4.49, hence config.json as 0.0.5.1's).
_V0_0_6 = replace(
    _V0_0_5_1, version="0.0.6", lm_head_fallback="embedding",
    card_method_names=MappingProxyType({}),
    methods=_V0_0_5_1.methods | _NEW_IN_0_0_6)

# 0.1.4 = 0.1.5's planner, parameters, rescale and file format, 0.0.5.1's tensor arithmetic
# where 0.1.5 rewrote it (merge_methods/base.py, dtype.py, linear.py, sparsify.py). Verified on
# all 121 parity recipes with transformers 4.57 (0.1.4 predates transformers 5): config.json
# has `dtype` and no `_name_or_path`. On transformers < 4.56 its config.json is 0.0.5.1's.
_V0_1_4 = Release(
    version="0.1.4", verified=True,
    duplicate_inputs="count_once",
    task_arithmetic_lambda=True, gradient_t_after_layers=0.0,
    post_weight_sources="first_slice_count", save_ties="task_index", writer_priority=10000,
    missing_dtype="base", lm_head_fallback="embedding", shape_mismatch="skip",
    linear_accumulator="compute", topk_at_least_one=False, breadcrumbs_band="slice",
    rescale="mask_then_scale", rescale_min_norm=1e-7, dare_rescale="l1_ratio",
    index=IndexFormat(("total_size", "mergekit_version"), indent=2, lone_shard=False),
    lone_shard_name=SINGLE_SHARD,
    tokenizer_files=_TOKENIZER_0_1,
    config_json="donor_keys_sorted_dtype",
    card_method_names=MappingProxyType({}),
    methods=_GTA_AND_LINEAR | _NEW_IN_0_0_6 | {
        "model_stock", "passthrough", "sce", "della", "della_linear", "arcee_fusion"},
)

_V0_1_5 = Release(
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
    tokenizers=True,
)

# Releases PyPI lacks that published merges name (verified=False): read from dated copies of
# mergekit's source and its pull requests, not run (tests/parity/NOTES.md § 23: the evidence and
# the confidence of each field). A version the table lacks: release_of_published.
_V0_1_2 = replace(
    # 0.1.0-0.1.2 (Feb-Mar 2025, BUSL): 0.1.4's planner, lambda and rescale (medium confidence:
    # copies of 0.1.x code are undated within the BUSL era) and its arithmetic; the writer of a
    # BUSL copy stamped "0.1.2": index {"metadata": {"mergekit_version"}} on one line (no
    # total_size), a lone shard named model.safetensors without an index (high for 0.1.2,
    # medium for 0.1.0/0.1.1); config.json of transformers <= 4.52, as 0.0.5.1's
    _V0_1_4, version="0.1.2", verified=False,
    index=IndexFormat(("mergekit_version",), indent=None, lone_shard=False),
    config_json="donor_keys_sorted")

RELEASES: dict[str, Release] = {
    r.version: r
    for r in (
        # 0.0.4.4 (2024-06-28): 0.0.5.1's code as far as its dated copies show (sparsify with
        # 1e-8 scale-then-mask, breadcrumbs, model_stock, the index with total_size); its card
        # may lack the model_stock name (low-medium)
        replace(_V0_0_5_1, version="0.0.4.4", verified=False),
        # verified: every parity recipe gives 0.0.5.1's files; only the index's version differs
        replace(_V0_0_5_1, version="0.0.5"),
        _V0_0_5_1,
        # 0.0.5.2 (2024-11-30): 0.0.5.1 plus PR #464's lm_head stand-in, merged the day of the
        # bump (medium: whether the build includes it); the card still 0.0.5.1's (medium)
        replace(_V0_0_5_1, version="0.0.5.2", verified=False, lm_head_fallback="embedding"),
        _V0_0_6,
        replace(_V0_1_2, version="0.1.0"),  # as 0.1.2: the "MergeKit v0.1" import (86c30b6)
        replace(_V0_1_2, version="0.1.1"),
        _V0_1_2,
        # 0.1.3 (tag 2025-06-06): 0.1.4 but for the license (PR #638) and the writer: the tag
        # writes 0.1.2's index; a 0.1.3 built from main after 321dc17 (2025-10-30) writes
        # 0.1.4's. config.json as 0.0.5.1's (transformers < 4.56 at the tag); karcher is 0.1.4's
        replace(_V0_1_2, version="0.1.3"),
        _V0_1_4,
        _V0_1_5,
    )
}
VERSIONS = tuple(RELEASES)
DEFAULT_VERSION = "0.1.5"
# A recipe listing a model twice, no release given: 0.1.5 refuses it, so remerge follows the
# release of that recipe's era (the seed's) that counted it once. Every release before 0.1.5
# counts it once; the newest of them (0.1.4) would also change the files' format, so the
# choice is named here rather than derived from the table's order.
DUPLICATES_VERSION = "0.0.5.1"


def get_release(version: str | None = None) -> Release:
    """The record of a release (the default one for None); unknown versions are refused."""
    version = DEFAULT_VERSION if version is None else str(version)
    if version not in RELEASES:
        raise RecipeError(f"mergekit version `{version}` is not supported "
                          f"(allowed: {', '.join(VERSIONS)})")
    return RELEASES[version]


def counting_duplicates_once() -> Release:
    """The release a recipe listing a model twice follows when none is given."""
    return RELEASES[DUPLICATES_VERSION]


_VERSION = re.compile(r"[0-9]+(\.[0-9]+)*")


def _number(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def release_of_published(recorded: str) -> Release:
    """Whose semantics to follow for the `mergekit_version` a published index records.

    A release with a record: that record (`verified` says whether it was run). Another
    version number: the newest release with a record that is not newer (the oldest one for
    a version before them all), with a warning naming both. Anything else is not a mergekit
    version: refused, so that no default is followed silently; `--mergekit-version` decides.
    """
    if recorded in RELEASES:
        return RELEASES[recorded]
    if not isinstance(recorded, str) or not _VERSION.fullmatch(recorded):
        raise AuditError(f"the published index records mergekit_version {recorded!r}, which is "
                          "not a mergekit version: give the release whose semantics to follow "
                          f"with --mergekit-version ({', '.join(VERSIONS)})")
    known = sorted(RELEASES.values(), key=lambda r: _number(r.version))
    older = [r for r in known if _number(r.version) <= _number(recorded)]
    follow = older[-1] if older else known[0]
    how = ("the newest release remerge knows that is not newer" if older else
           "the oldest release remerge knows; it is older than all of them")
    log.warning("published with mergekit %s, which remerge has no record of: following mergekit "
                "%s's semantics (%s; --mergekit-version chooses another)", recorded, follow.version, how)
    return follow


def verified_for(release: Release, recorded: str | None) -> bool:
    """Whether following `release` rests on a run of the real mergekit: its record is verified
    and, when the published index records a version (`recorded`; None: none, or the user chose
    the release), it is that very release rather than the nearest one with a record."""
    return release.verified and (recorded is None or recorded == release.version)
