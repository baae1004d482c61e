"""The merge methods: a registry of specs, one module per family (as mergekit's `merge_methods/`).

A `MethodSpec` says what a recipe may set (parameters, their scope and defaults), what inputs
the method needs, whether it draws random numbers, how the model card names it, and which
function computes one tensor. The same table feeds recipe validation, the model card's
"Merge Method" section and the docs (`config/README.md`).

Nothing here imports torch: the family modules import it on first use (`remerge.lazy`), so
the Snakefile and the plan job can validate recipes without paying seconds for torch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from remerge.errors import RecipeError

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import torch

    from remerge.merge.releases import Release
    from remerge.merge.tensor import TensorInputs, TensorTask


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()  # the default of a parameter a recipe must set


@dataclass(frozen=True)
class Parameter:
    """One parameter a recipe may set for a method."""

    name: str
    scope: str  # "model": per model, else the global value | "global": the global value only
    default: Any  # REQUIRED, or the value when the recipe sets none (None: "not set")
    kind: str = "number"  # "number" | "integer" | "flag"
    valid: Callable[[float], bool] | None = None  # the range a number must lie in
    allowed: str = ""  # that range in words, for messages and docs
    release_flag: str | None = None  # a `Release` field that must be true, else it is ignored
    doc: str = ""

    def read_by(self, release: "Release") -> bool:
        """Whether `release` reads this parameter (False: it ignores what a recipe sets)."""
        return self.release_flag is None or bool(getattr(release, self.release_flag))


# The result of one output tensor, in the compute dtype: (task, inputs, pool) -> tensor.
MergeFunction = Callable[["TensorTask", "TensorInputs", "Executor | None"], "torch.Tensor"]


@dataclass(frozen=True)
class MethodSpec:
    """One merge method as mergekit registers it, and the function that computes a tensor."""

    name: str  # as recipes spell it (`merge_method:`)
    pretty_name: str  # as the model card names it
    paper: str | None  # the card links the method's paper
    family: str  # the module holding its arithmetic
    parameters: tuple[Parameter, ...]
    # `base_model`: "required" (not merged as a model), "optional" (subtracted when given) or
    # "ignored" (an input like the others: mergekit appends it to the models when unlisted)
    base: str
    random: bool  # draws random numbers (results depend on --random-seed)
    merge: MergeFunction
    # how many inputs (base included) and non-base inputs mergekit accepts: (min, max or None)
    inputs: tuple[int, int | None] = (1, None)
    non_base: tuple[int, int | None] = (0, None)
    # True when, for this tensor, the whole computation is `base + (x - base)` in the compute
    # dtype (the torch-free fused kernel may then compute it)
    is_plain_difference: Callable[["TensorTask"], bool] = lambda task: False
    # True when, for this tensor, each output element is a function of the same element of
    # every input alone (no norm, rank, mean or random draw over the tensor): then a run of
    # rows computed alone gives the very bytes of the whole computation there, and the tensor
    # may be computed in chunks (`remerge.merge.tensor.choose_chunk_rows`)
    is_elementwise: Callable[["TensorTask"], bool] = lambda task: False
    # the dtype the method's result has, from the compute dtype (most: the same)
    result_dtype: Callable[[str], str] = lambda compute: compute
    card_base: bool = True  # the card says "using <base> as a base" (else lists it as merged)

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def uses_base(self) -> bool:
        """The base is its own input of the method (not one of the merged models)."""
        return self.base != "ignored"

    def parameter(self, name: str) -> Parameter:
        return next(p for p in self.parameters if p.name == name)

    @property
    def parameter_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.parameters)

    def scoped(self, scope: str) -> tuple[Parameter, ...]:
        return tuple(p for p in self.parameters if p.scope == scope)

    def default(self, name: str) -> Any:
        return self.parameter(name).default

    def card_name(self, release: "Release") -> str:
        """The method as the followed release's model card writes it."""
        if self.name in release.card_method_names:
            return release.card_method_names[self.name]
        if release.card_method_names:  # a release with its own names writes others bare
            return self.name
        return f"[{self.pretty_name}]({self.paper})" if self.paper else self.pretty_name


def methods_markdown() -> str:
    """The methods and the parameters each accepts, as a markdown table (config/README.md
    holds it; `python -m remerge.merge.methods` prints it)."""
    lines = ["| method | paper | per model (or global) | global only | random |",
             "|---|---|---|---|---|"]

    def show(p: Parameter) -> str:
        default = "not set" if p.default is None else repr(p.default).lower()
        return f"`{p.name}` ({default})"

    for spec in METHODS.values():
        paper = f"[{spec.pretty_name}]({spec.paper})" if spec.paper else spec.pretty_name
        lines.append(f"| `{spec.name}` | {paper} | {', '.join(map(show, spec.scoped('model'))) or '-'} "
                     f"| {', '.join(map(show, spec.scoped('global'))) or '-'} | {'yes' if spec.random else 'no'} |")
    return "\n".join(lines) + "\n"


def _registry() -> dict[str, MethodSpec]:
    from remerge.merge.methods import (
        arcee_fusion, linear, model_stock, nearswap, passthrough, ram, sce, spherical,
        task_arithmetic,
    )

    families = (task_arithmetic, linear, spherical, model_stock, sce, nearswap, arcee_fusion,
                ram, passthrough)
    specs = [spec for family in families for spec in family.SPECS]
    return {spec.name: spec for spec in specs}


METHODS: dict[str, MethodSpec] = _registry()


def get_method(name: Any) -> MethodSpec:
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise RecipeError(f"merge_method `{name}` is not supported ({hint}supported: "
                          f"{', '.join(METHODS)})")
    return METHODS[name]
