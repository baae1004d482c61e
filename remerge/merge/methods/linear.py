"""Linear: a weighted average of every input (mergekit's `linear.py`; model soups).

    out = sum(w_i * x_i) / sum(w_i)        (without the division when normalize is off)

The releases differ in where the sum runs (`Release.linear_accumulator`): 0.1.5 accumulates
in float32 (float64 for float64 inputs) and casts back once; 0.0.5.1 stacks the inputs and
computes `(w * x).sum(0) / w.sum(0)` in their dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from remerge.lazy import lazy_import
from remerge.merge.methods import REQUIRED, MethodSpec, Parameter

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import torch

    from remerge.merge.releases import Release
    from remerge.merge.tensor import TensorInputs, TensorTask
else:
    torch = lazy_import("torch")


def linear(inputs: Sequence["torch.Tensor"], weights: Sequence[float], normalize: bool,
           release: "Release") -> "torch.Tensor":
    """The weighted average of `inputs` (each `(*shape)`), in their dtype."""
    first = inputs[0]
    if release.linear_accumulator == "compute":
        stacked = torch.stack(list(inputs), dim=0)  # (n, *shape)
        w = torch.tensor(list(weights), dtype=stacked.dtype).reshape(-1, *([1] * first.ndim))
        result = (w * stacked).sum(dim=0)
        return result / w.sum(dim=0) if normalize else result
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(list(weights), dtype=acc)
    result = torch.zeros_like(first, dtype=acc)
    for x, coefficient in zip(inputs, w.unbind(0)):
        result.addcmul_(x, coefficient)
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)


def merge(task: "TensorTask", inputs: "TensorInputs", pool: "Executor | None" = None) -> "torch.Tensor":
    tensors = [inputs.model(i) for i in range(len(task.params))]
    return linear(tensors, [p["weight"] for p in task.params], task.shared["normalize"], task.release)


SPECS = (
    MethodSpec(
        name="linear", pretty_name="Linear", paper="https://arxiv.org/abs/2203.05482",
        family=__name__,
        parameters=(
            Parameter("weight", "model", REQUIRED, doc="the model's weight in the average"),
            Parameter("normalize", "global", True, kind="flag", doc="divide by the sum of the weights"),
        ),
        base="ignored", random=False, merge=merge,
        is_elementwise=lambda task: True,  # a weighted sum per element, in either release
    ),
)
