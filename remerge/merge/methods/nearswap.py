"""NearSwap (mergekit's `nearswap.py`): take the other model's value where it is near the
base's, and move toward it by t / |a - b| elsewhere.

    w   = clamp(t / max(|a - b|, 1e-6), 0, 1)      (`t / x` as torch computes it: t * (1 / x))
    out = w * b + (1 - w) * a                       a: the base, b: the other model

In the inputs' dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from remerge.lazy import lazy_import
from remerge.merge.methods import REQUIRED, MethodSpec, Parameter

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import torch

    from remerge.merge.tensor import TensorInputs, TensorTask
else:
    torch = lazy_import("torch")


def nearswap(a: "torch.Tensor", b: "torch.Tensor", t: float) -> "torch.Tensor":
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


def merge(task: "TensorTask", inputs: "TensorInputs", pool: "Executor | None" = None) -> "torch.Tensor":
    return nearswap(inputs.base(), inputs.model(0), task.shared["t"])


SPECS = (
    MethodSpec(
        name="nearswap", pretty_name="NearSwap",
        paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", family=__name__,
        base="required", inputs=(2, 2), random=False, merge=merge,
        parameters=(Parameter("t", "global", REQUIRED,
                              doc="entries closer than t take the other model's value"),),
    ),
)
