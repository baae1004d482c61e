"""SCE (mergekit's `sce.py`): select the entries where the fine-tunes disagree most, elect
signs, and weight each model by its task vector's energy.

    D    = stack(x_i - base)                              (n, *shape)
    D   *= mask of the top `select_topk` share of var(D, over models)   (when < 1)
    keep = sign(D) == sign of sum(D)                       TIES-style election
    w_i  = mean(D_i^2) / sum_j mean(D_j^2)
    out  = base + sum(w_i keep_i D_i) / max(sum(w_i keep_i), 1e-6)

In the inputs' dtype. There is no per-model weight: mergekit ignores one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from remerge.lazy import lazy_import
from remerge.merge.methods import MethodSpec, Parameter
from remerge.merge.methods.task_arithmetic import INT8_MASK, consensus_mask

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import torch

    from remerge.merge.tensor import TensorInputs, TensorTask
else:
    torch = lazy_import("torch")


def topk_variance_mask(deltas: "torch.Tensor", share: float, dtype: "torch.dtype") -> "torch.Tensor":
    """1 at the `share` of entries with the largest variance over the models, else 0."""
    if share <= 0:
        return torch.zeros_like(deltas[0], dtype=dtype)
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * share)  # a float32 product, as mergekit computes it
    mask = torch.zeros_like(var, dtype=dtype)
    if k > 0:
        _, top = torch.topk(var.abs().view(-1), k=k, largest=True)
        mask.view(-1)[top] = 1
    return mask


def sce(base: "torch.Tensor", xs: Sequence["torch.Tensor"], select_topk: float, int8: bool) -> "torch.Tensor":
    if not xs:
        return base
    mask_dtype = torch.int8 if int8 else base.dtype
    deltas = torch.stack([x - base for x in xs], 0)  # (n, *shape)
    if select_topk < 1:
        deltas = deltas * topk_variance_mask(deltas, select_topk, mask_dtype).unsqueeze(0)
    keep = consensus_mask(deltas, int8)
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)  # (n,)
    total = torch.sum(energy).item()
    w = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    w = w.reshape(-1, *([1] * base.dim()))
    kept = w * keep
    return base + (deltas * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)


def merge(task: "TensorTask", inputs: "TensorInputs", pool: "Executor | None" = None) -> "torch.Tensor":
    xs = [inputs.model(i) for i in range(len(task.params))]
    return sce(inputs.base(), xs, task.shared["select_topk"], task.shared["int8_mask"])


SPECS = (
    MethodSpec(
        name="sce", pretty_name="SCE", paper="https://arxiv.org/abs/2408.07990",
        family=__name__, base="required", random=False, merge=merge,
        parameters=(
            INT8_MASK,
            Parameter("select_topk", "global", 1.0,
                      doc="share of entries kept, by variance across the models"),
        ),
    ),
)
