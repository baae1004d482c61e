"""Reinforced Agent Merging (mergekit's `ram.py`): per entry, a task-vector value that only one
model moves (beyond epsilon) is taken whole; values several models move are averaged.
`ramplus_tl` also boosts each model's unique entries by 1 + r * min(shared / unique, alpha).

In the inputs' dtype (ramplus_tl's boost is float32, so its result is float32).
Shapes: task vectors flattened to `(n, numel)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from remerge.lazy import lazy_import
from remerge.merge.methods import MethodSpec, Parameter

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import torch

    from remerge.merge.tensor import TensorInputs, TensorTask
else:
    torch = lazy_import("torch")


def ram(base: "torch.Tensor", xs: Sequence["torch.Tensor"], epsilon: float, r: float | None = None,
        alpha: float | None = None) -> "torch.Tensor":
    """RAM, or with `r` and `alpha` RAM+ (tensor-local)."""
    if not xs:
        return base
    deltas = torch.stack([x - base for x in xs], 0).view(len(xs), -1)  # (n, numel)
    moved = deltas.abs() > epsilon
    count = moved.sum(dim=0, keepdim=True)  # (1, numel) int64
    shared, unique = count > 1, count == 1
    kept = deltas * moved
    alone = kept * unique
    if r is not None:
        rho = (moved & shared).sum(dim=1) / (moved & unique).sum(dim=1).clamp(min=epsilon)  # (n,) float32
        alone = alone * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (alone + kept * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def merge(task: "TensorTask", inputs: "TensorInputs", pool: "Executor | None" = None) -> "torch.Tensor":
    xs = [inputs.model(i) for i in range(len(task.params))]
    s = task.shared
    return ram(inputs.base(), xs, s["epsilon"], s.get("r"), s.get("alpha"))


RAM_PAPER = "https://arxiv.org/abs/2601.13572"
EPSILON = Parameter("epsilon", "global", 1e-5, doc="a task-vector entry counts when |delta| > epsilon")
SPECS = (
    MethodSpec(
        name="ram", pretty_name="Reinforced Agent Merging", paper=RAM_PAPER, family=__name__,
        base="required", random=False, merge=merge, parameters=(EPSILON,),
    ),
    MethodSpec(
        name="ramplus_tl", pretty_name="Reinforced Agent Merging Plus (Tensor-Local)",
        paper=RAM_PAPER, family=__name__, base="required", random=False, merge=merge,
        result_dtype=lambda compute: "float64" if compute == "float64" else "float32",
        parameters=(
            Parameter("r", "global", 0.1, doc="strength of the boost of unique entries"),
            Parameter("alpha", "global", 0.2, doc="cap of the shared/unique ratio"),
            EPSILON,
        ),
    ),
)
