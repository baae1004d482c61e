"""Passthrough (mergekit's `passthrough.py`): one model's tensors, optionally scaled. With
`slices:` it stacks layers of several models (frankenmerges); over whole models it copies one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from remerge.merge.methods import MethodSpec, Parameter

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import torch

    from remerge.merge.tensor import TensorInputs, TensorTask


def merge(task: "TensorTask", inputs: "TensorInputs", pool: "Executor | None" = None) -> "torch.Tensor":
    x = inputs.model(0)
    scale = task.params[0]["scale"]
    return x if scale is None else x * scale


SPECS = (
    MethodSpec(
        name="passthrough", pretty_name="Passthrough", paper=None, family=__name__,
        base="ignored", inputs=(1, 1), random=False, merge=merge,
        parameters=(Parameter("scale", "model", None, doc="multiply the tensor by this"),),
    ),
)
