"""Model Stock (mergekit's `model_stock.py`): interpolate between the base and the average of
the fine-tunes by a ratio t from the angle between their task vectors.

    cos = mean over pairs i < j of cos(x_i - base, x_j - base)
    t   = k cos / (1 + (k - 1) cos)                (k fine-tunes; 0 where the divisor vanishes)
    out = t * mean(x_i) + (1 - t) * base

In the inputs' dtype; `filter_wise`: one t per row of a matrix. Shapes: `(*shape)`.
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


def model_stock(base: "torch.Tensor", xs: Sequence["torch.Tensor"], filter_wise: bool) -> "torch.Tensor":
    shape = base.shape
    if not filter_wise:
        base, xs = base.reshape(-1), [x.reshape(-1) for x in xs]
    elif base.dim() == 1:
        base, xs = base.unsqueeze(0), [x.unsqueeze(0) for x in xs]
    offsets = [x - base for x in xs]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (1,) or (rows, 1)
    k = len(xs)
    divisor = 1 + (k - 1) * cos
    singular = divisor.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (k * cos) / torch.where(singular, torch.ones_like(divisor), divisor))
    average = sum(xs) / k  # Python's sum: rounded to the dtype after each addition
    return (t * average + (1 - t) * base).reshape(shape)


def merge(task: "TensorTask", inputs: "TensorInputs", pool: "Executor | None" = None) -> "torch.Tensor":
    xs = [inputs.model(i) for i in range(len(task.params))]
    return model_stock(inputs.base(), xs, task.shared["filter_wise"])


SPECS = (
    MethodSpec(
        name="model_stock", pretty_name="Model Stock", paper="https://arxiv.org/abs/2403.19522",
        family=__name__, base="required", inputs=(3, None), random=False, merge=merge,
        parameters=(Parameter("filter_wise", "global", False, kind="flag",
                              doc="one ratio per row of a matrix instead of per tensor"),),
    ),
)
