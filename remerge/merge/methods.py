"""Merge methods declared as data: name, paper, steps, parameters and their defaults.

The same table drives recipe validation, the arithmetic (`remerge.merge.tensor_ops`) and the model
card's "Merge Method" section. No torch here, so the workflow can import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GTA_SHARED = ("int8_mask", "normalize", "rescale")
LEGACY = "0.0.5.1"


@dataclass(frozen=True)
class MethodSpec:
    """One merge method: its name, paper, and the steps of generalized task arithmetic."""

    name: str
    pretty_name: str
    paper: str
    sparsification: str | None  # "magnitude" | "random" | "magnitude_outliers" | None
    consensus: bool  # TIES sign election ("sum" method)
    default_normalize: bool
    default_rescale: bool
    linear: bool = False  # a weighted average of all inputs instead of task arithmetic

    @property
    def needs_base(self) -> bool:
        return not self.linear

    @property
    def random(self) -> bool:
        return self.sparsification == "random"

    @property
    def model_parameters(self) -> tuple[str, ...]:
        if self.linear:
            return ("weight",)
        extra = ("gamma",) if self.sparsification == "magnitude_outliers" else ()
        return ("weight", "density") + extra

    def shared_parameters(self, version: str) -> tuple[str, ...]:
        if self.linear:
            return ("normalize",)
        # `lambda` exists for these methods from mergekit 0.1 on; 0.0.5.1 ignored it.
        return GTA_SHARED + (() if version == LEGACY else ("lambda",))

    def ignored_parameters(self, version: str) -> frozenset[str]:
        return frozenset({"lambda"}) if version == LEGACY and not self.linear else frozenset()

    def parameter_names(self, version: str) -> frozenset[str]:
        return frozenset(self.model_parameters + self.shared_parameters(version))

    def default(self, name: str) -> Any:
        return {
            "normalize": True if self.linear else self.default_normalize,
            "rescale": self.default_rescale,
            "int8_mask": False,
            "lambda": 1.0,
            "density": 1.0,
            "gamma": 0.01,
        }.get(name)


TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"

METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("ties", "TIES", TIES_PAPER, "magnitude", True, True, False),
        MethodSpec("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
                   None, False, False, False),
        MethodSpec("linear", "Linear", "https://arxiv.org/abs/2203.05482",
                   None, False, True, False, linear=True),
        MethodSpec("breadcrumbs", "Model Breadcrumbs", BREADCRUMBS_PAPER,
                   "magnitude_outliers", False, False, False),
        MethodSpec("breadcrumbs_ties", "Model Breadcrumbs with TIES", BREADCRUMBS_PAPER,
                   "magnitude_outliers", True, False, False),
        MethodSpec("dare_ties", "DARE TIES", DARE_PAPER, "random", True, False, True),
        MethodSpec("dare_linear", "Linear DARE", DARE_PAPER, "random", False, False, True),
    )
}


# How mergekit 0.0.5.1's model card names each method (0.1.5: "[pretty name](paper)").
LEGACY_CARD_NAMES = {
    "linear": "[linear](https://arxiv.org/abs/2203.05482)",
    "ties": f"[TIES]({TIES_PAPER})",
    "task_arithmetic": "[task arithmetic](https://arxiv.org/abs/2212.04089)",
    "dare_ties": f"[DARE]({DARE_PAPER}) [TIES]({TIES_PAPER})",
    "dare_linear": f"linear [DARE]({DARE_PAPER})",
}


def card_method(method: MethodSpec, version: str) -> str:
    """The method as the followed mergekit version's model card writes it."""
    if version == LEGACY:
        return LEGACY_CARD_NAMES.get(method.name, method.name)
    return f"[{method.pretty_name}]({method.paper})"
