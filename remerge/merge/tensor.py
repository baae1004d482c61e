"""One output tensor: its task, decided once, and the one function that computes its bytes.

    plan_tensor(recipe, tensor, seed) -> TensorTask     parameters resolved, kernel chosen
    merge_tensor(task, models, pool)  -> numpy array    the output tensor's bytes

Every route to a tensor's bytes goes through `merge_tensor`: the workflow's shard jobs and
`remerge merge` (through the streaming loop, `remerge.merge.stream`) and `remerge audit`, so
an audit checks exactly what a merge computes. The kernel is chosen in `plan_tensor`:

- "plain_difference": the whole computation is `base + (x - base)` in bf16 on bf16 inputs
  (the seed's recipe): a fused one-pass kernel on the files' bytes, without torch;
- "method": the method's own function (`MethodSpec.merge`), in torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

from remerge.io.layout import tensor_nbytes
from remerge.io.safetensors import ModelFolder, torch_dtype
from remerge.merge.kernels import native
from remerge.merge.methods import MethodSpec
from remerge.merge.parameters import tensor_parameters
from remerge.merge.plan import TensorPlan
from remerge.merge.recipe import Recipe
from remerge.merge.releases import Release

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import numpy
    import torch

PLAIN_DIFFERENCE = "plain_difference"
METHOD = "method"


@dataclass(frozen=True)
class Source:
    """Where one input of a tensor is read."""

    model: str  # the recipe's reference
    tensor: str  # the tensor's name in that model (lm_head may read a tied embedding)
    dtype: str  # as stored (safetensors name)


@dataclass(frozen=True)
class TensorTask:
    """Everything that decides one output tensor's bytes, resolved once."""

    name: str
    shape: tuple[int, ...]
    method: MethodSpec
    release: Release
    kernel: str  # PLAIN_DIFFERENCE | METHOD
    base: Source | None  # None for methods without a base
    models: tuple[Source, ...]  # the merged models that have this tensor, recipe order
    params: tuple[Mapping[str, Any], ...]  # per merged model: {parameter: value}
    shared: Mapping[str, Any]  # the method's global parameters: {parameter: value}
    seeds: tuple[int, ...]  # per merged model, for random methods
    compute_dtype: str  # torch name, e.g. "bfloat16"
    dtype: str  # safetensors name of the output, e.g. "BF16"

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @property
    def sources(self) -> tuple[Source, ...]:
        return ((self.base,) if self.base else ()) + self.models


def tensor_seed(seed: int, tensor: str, model_index: int) -> int:
    """A 63-bit seed per (run seed, tensor, model): a random method's result depends only on
    these, never on the order in which tensors or shards are computed, or on threads."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def plan_tensor(recipe: Recipe, tensor: TensorPlan, seed: int = 0) -> TensorTask:
    """The task of one output tensor: its inputs, resolved parameters and kernel."""
    def source(ref: str) -> Source:
        return Source(ref, tensor.sources[ref], tensor.stored[ref])

    merged = [ref for ref in recipe.mergers if tensor.sources.get(ref)]
    shared, per_model = tensor_parameters(recipe, tensor.name, tensor.t, merged)
    task = TensorTask(
        name=tensor.name, shape=tuple(tensor.shape), method=recipe.method, release=recipe.release,
        kernel=METHOD,
        base=source(recipe.base_model) if recipe.method.uses_base and recipe.base_model else None,
        models=tuple(source(ref) for ref in merged),
        params=tuple(per_model[ref] for ref in merged), shared=shared,
        seeds=tuple(tensor_seed(seed, tensor.name, recipe.inputs.index(ref)) for ref in merged),
        compute_dtype=tensor.compute_dtype, dtype=tensor.dtype,
    )
    return replace(task, kernel=choose_kernel(task))


def choose_kernel(task: TensorTask) -> str:
    """How the tensor is computed: the one place that decides it."""
    bf16 = (task.compute_dtype == "bfloat16" and task.dtype == "BF16"
            and all(s.dtype == "BF16" for s in task.sources))
    if task.base is not None and bf16 and task.method.is_plain_difference(task):
        return PLAIN_DIFFERENCE
    return METHOD


class TensorInputs:
    """A task's input tensors, read when the method asks for them: mapped from the files (not
    copied; never write to them) and cast to the compute dtype."""

    def __init__(self, task: TensorTask, models: Mapping[str, ModelFolder]):
        self.task = task
        self.folders = models

    def base(self) -> "torch.Tensor":
        return self._read(self.task.base)

    def model(self, i: int) -> "torch.Tensor":
        return self._read(self.task.models[i])

    def _read(self, src: Source) -> "torch.Tensor":
        return self.folders[src.model].view(src.tensor).to(torch_dtype(self.task.compute_dtype))


def merge_tensor(task: TensorTask, models: Mapping[str, ModelFolder],
                 pool: "Executor | None" = None) -> "numpy.ndarray":
    """The output tensor's bytes, as the followed mergekit release writes them: a flat
    array of unsigned integers of the element's width."""
    if task.kernel == PLAIN_DIFFERENCE:
        data = _plain_difference(task, models, pool)
        if data is not None:
            return data
    result = task.method.merge(task, TensorInputs(task, models), pool)
    return _as_bytes(result.to(torch_dtype(task.dtype)), task)


def _plain_difference(task: TensorTask, models: Mapping[str, ModelFolder],
                      pool: "Executor | None") -> "numpy.ndarray | None":
    """`base + (x - base)` on the raw bf16 bits (no torch); None when the kernel cannot be
    used here or a difference is not finite (then the method's own arithmetic decides)."""
    base = models[task.base.model].raw(task.base.tensor)
    if not task.models:
        return base  # no merged model has this tensor: mergekit writes the base's
    x = models[task.models[0].model].raw(task.models[0].tensor)
    return native.plain_difference_raw(x, base, pool)


_UNSIGNED = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def _as_bytes(result: "torch.Tensor", task: TensorTask) -> "numpy.ndarray":
    import torch

    if tuple(result.shape) != task.shape:  # a bug, not bad input
        raise AssertionError(f"tensor {task.name}: computed shape {tuple(result.shape)}, planned {task.shape}")
    signed = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[result.element_size()]
    flat = result.detach().contiguous().reshape(-1).view(signed).numpy()
    return flat.view(_UNSIGNED[result.element_size()])


def use_torch_threads(threads: int | None) -> None:
    """torch's intra-op threads (for the "method" kernel); None keeps torch's default."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
