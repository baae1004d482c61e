"""Arcee Fusion (mergekit's `arcee_fusion.py`): keep the fine-tune's change only where it
matters most: where |delta| times the row's KL divergence between the two models' softmaxes
is an upper outlier (above median + 1.5 IQR).

    imp  = |x - base| * KL(softmax(x) || softmax(base))     per row (one value for 1-D)
    out  = base + (x - base) * (imp >= q2 + 1.5 (q3 - q1))   the mask in float32

The quantiles of a tensor over 10^6 elements come from 10^6 entries drawn at random (from a
generator seeded per tensor here; mergekit's global one). The result is float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from remerge.lazy import lazy_import
from remerge.merge.methods import MethodSpec

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import torch

    from remerge.merge.tensor import TensorInputs, TensorTask
else:
    torch = lazy_import("torch")

SAMPLE = 1_000_000  # quantiles of larger tensors are taken on this many sampled entries


def arcee_fusion(base: "torch.Tensor", x: "torch.Tensor", seed: int) -> "torch.Tensor":
    diff = (x - base).abs()
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > SAMPLE:
        generator = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=generator)]
    ordered, _ = torch.sort(flat)
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    threshold = median + 1.5 * (q3 - q1)
    return base + (x - base) * (importance >= threshold).float()


def merge(task: "TensorTask", inputs: "TensorInputs", pool: "Executor | None" = None) -> "torch.Tensor":
    return arcee_fusion(inputs.base(), inputs.model(0), task.seeds[0])


SPECS = (
    MethodSpec(
        name="arcee_fusion", pretty_name="Arcee Fusion", paper="https://arcee.ai",
        family=__name__, base="required", inputs=(2, 2), random=True, merge=merge,
        result_dtype=lambda compute: "float64" if compute == "float64" else "float32",
        parameters=(),
    ),
)
