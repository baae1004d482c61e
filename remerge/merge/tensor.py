"""One output tensor: its task, decided once, and the one function that computes its bytes.

    plan_tensor(recipe, tensor, seed) -> TensorTask     parameters resolved, kernel and chunks chosen
    merge_chunks(task, models, pool)  -> (first element, numpy array), ...   its bytes, in order
    merge_tensor(task, models, pool)  -> numpy array    the same bytes at once (the chunks joined)

Every route to a tensor's bytes goes through `merge_chunks`: the workflow's shard jobs and
`remerge merge` (through the streaming loop, `remerge.merge.stream`, which writes each chunk at
its offset) and `remerge audit` (through `merge_tensor`), so an audit checks exactly what a
merge computes. Two choices are made in `plan_tensor`, each in one function:

- the kernel (`choose_kernel`): "plain_difference" when the whole computation is
  `base + (x - base)` in bf16 on bf16 inputs (the seed's recipe), a fused one-pass kernel on
  the files' bytes, without torch; else "method", the method's own function
  (`MethodSpec.merge`), in torch;
- the chunks (`choose_chunk_rows`): an elementwise task (`MethodSpec.is_elementwise`) larger
  than `CHUNK_ELEMENTS` is computed a run of rows at a time, each run read from the files for
  those rows only, so memory does not grow with the tensor; the others at once.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from remerge.io.layout import tensor_nbytes
from remerge.io.safetensors import ModelFolder, Rows, row_span, torch_dtype
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

# Elements of an elementwise task computed at once (8 MB of bf16 output): small enough that a
# chunk's working set (tens of bytes per element, `remerge.workflow.config.shard_mem_mb`) is
# far below the baseline of a process, large enough that the per-chunk cost (a mapping per
# input, a few torch calls) is lost in the arithmetic.
CHUNK_ELEMENTS = 1 << 22
# Every chunk starts at a multiple of this many elements. torch's elementwise loops run in
# vectors from the start of each range they are given and finish the last few elements one by
# one; both give the same finite values, but a NaN's sign and payload can differ between the
# two. Aligned chunks leave those positions where the whole tensor's loop has them (in one
# thread; torch's own split between threads moves them too, in mergekit as well). The rows of
# real weight matrices (4096, 14336 elements) are multiples of it already.
CHUNK_ALIGN = 1024


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
    chunk_rows: int | None = None  # rows of the first dimension computed at once; None: all
    vocab: Mapping[str, Any] | None = None  # an embedding re-rowed for a tokenizer (`TensorPlan.vocab`)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @property
    def chunk_numel(self) -> int:
        """Elements computed at once: a chunk's, or the whole tensor's."""
        numel = math.prod(self.shape)
        if self.chunk_rows is None:
            return numel
        return min(self.chunk_rows, self.shape[0]) * (numel // self.shape[0])

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of output computed at once."""
        return tensor_nbytes(self.dtype, (self.chunk_numel,))

    @property
    def sources(self) -> tuple[Source, ...]:
        return ((self.base,) if self.base else ()) + self.models


def tensor_seed(seed: int, tensor: str, model_index: int) -> int:
    """A 63-bit seed per (run seed, tensor, model): a random method's result depends only on
    these, never on the order in which tensors or shards are computed, or on threads."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def plan_tensor(recipe: Recipe, tensor: TensorPlan, seed: int = 0) -> TensorTask:
    """The task of one output tensor: its inputs, resolved parameters, kernel and chunks."""
    def source(ref: str) -> Source:
        return Source(ref, tensor.sources[ref], tensor.stored[ref])

    # the tensor's inputs in its slice's order, the base apart for a method that takes it apart
    merged = [ref for ref, src in tensor.sources.items()
              if src and not (recipe.method.uses_base and ref == recipe.base_model)]
    shared, per_model = tensor_parameters(recipe, tensor.name, tensor.t, merged, tensor.slice,
                                          {ref: tensor.input_name(ref) for ref in merged})
    task = TensorTask(
        name=tensor.name, shape=tuple(tensor.shape), method=recipe.method, release=recipe.release,
        kernel=METHOD,
        base=source(recipe.base_model) if recipe.method.uses_base and recipe.base_model else None,
        models=tuple(source(ref) for ref in merged),
        params=tuple(per_model[ref] for ref in merged), shared=shared,
        seeds=tuple(tensor_seed(seed, tensor.name, recipe.inputs.index(ref)) for ref in merged),
        compute_dtype=tensor.compute_dtype, dtype=tensor.dtype, vocab=tensor.vocab,
    )
    task = replace(task, kernel=choose_kernel(task))
    return replace(task, chunk_rows=choose_chunk_rows(task, CHUNK_ELEMENTS))


def choose_kernel(task: TensorTask) -> str:
    """How the tensor is computed: the one place that decides it."""
    bf16 = (task.compute_dtype == "bfloat16" and task.dtype == "BF16"
            and all(s.dtype == "BF16" for s in task.sources))
    if task.base is not None and bf16 and task.vocab is None and task.method.is_plain_difference(task):
        return PLAIN_DIFFERENCE
    return METHOD


def choose_chunk_rows(task: TensorTask, budget: int) -> int | None:
    """How many rows of the first dimension are computed at once (None: the whole tensor): the
    one place that decides it.

    Only an elementwise task is cut (`MethodSpec.is_elementwise`: each output element is a
    function of the same element of every input, so a run of rows computed alone gives the
    very bytes the whole computation gives there), and only when it is larger than `budget`
    elements. Rows keep every chunk one contiguous byte range of each input and of the output;
    their count is a multiple of what starts each chunk at a multiple of `CHUNK_ALIGN`
    elements, so a chunk may exceed the budget (a row longer than it: one row per chunk)."""
    numel = math.prod(task.shape)
    if not task.shape or numel <= budget or task.vocab is not None or not task.method.is_elementwise(task):
        return None
    row = numel // task.shape[0]
    step = CHUNK_ALIGN // math.gcd(row, CHUNK_ALIGN)  # rows
    rows = max(step, budget // row // step * step)
    return rows if rows < task.shape[0] else None


def chunk_ranges(task: TensorTask) -> list[Rows | None]:
    """The row ranges [start, stop) the task is computed in, in order ([None]: all at once)."""
    if task.chunk_rows is None:
        return [None]
    rows = task.shape[0]
    return [(start, min(rows, start + task.chunk_rows)) for start in range(0, rows, task.chunk_rows)]


class TensorInputs:
    """A task's input tensors (or rows [start, stop) of them), read when the method asks for
    them: mapped from the files (not copied; never write to them), cast to the compute dtype.
    An embedding under a tokenizer setting (`task.vocab`) is read whole and re-rowed, every
    input at once (a token one model lacks takes another's row)."""

    def __init__(self, task: TensorTask, models: Mapping[str, ModelFolder], rows: Rows | None = None):
        self.task = task
        self.folders = models
        self.rows = rows
        self._permuted: dict[str, "torch.Tensor"] | None = None

    def base(self) -> "torch.Tensor":
        return self._read(self.task.base)

    def model(self, i: int) -> "torch.Tensor":
        return self._read(self.task.models[i])

    def _read(self, src: Source) -> "torch.Tensor":
        if self.task.vocab is not None:
            return self._vocabulary()[src.model]
        view = self.folders[src.model].view(src.tensor, self.rows)
        return view.to(torch_dtype(self.task.compute_dtype))

    def _vocabulary(self) -> dict[str, "torch.Tensor"]:
        from remerge.merge.tokenizer import permute_embeddings

        if self._permuted is None:
            dtype = torch_dtype(self.task.compute_dtype)
            self._permuted = permute_embeddings(
                {s.model: self.folders[s.model].view(s.tensor).to(dtype) for s in self.task.sources},
                self.task.vocab)
        return self._permuted


def merge_chunks(task: TensorTask, models: Mapping[str, ModelFolder],
                 pool: "Executor | None" = None) -> Iterator[tuple[int, "numpy.ndarray"]]:
    """The output tensor's bytes, as the followed mergekit release writes them, chunk by chunk
    (`chunk_ranges`): (the chunk's first element, its bytes as a flat array of unsigned
    integers of the element's width), in order. A chunk is computed when it is asked for,
    while the disk reads the next one's inputs."""
    ranges = chunk_ranges(task)
    for i, rows in enumerate(ranges):
        if i + 1 < len(ranges):
            for src in task.sources:
                models[src.model].prefetch(src.tensor, ranges[i + 1])
        first, _, shape = row_span(task.shape, rows)
        yield first, _merge_rows(task, models, pool, rows, shape)


def merge_tensor(task: TensorTask, models: Mapping[str, ModelFolder],
                 pool: "Executor | None" = None) -> "numpy.ndarray":
    """The whole output tensor's bytes in one flat array: its chunks joined."""
    import numpy as np

    parts = [data for _, data in merge_chunks(task, models, pool)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _merge_rows(task: TensorTask, models: Mapping[str, ModelFolder], pool: "Executor | None",
                rows: Rows | None, shape: tuple[int, ...]) -> "numpy.ndarray":
    """The bytes of rows [start, stop) of the output (None: all), of that `shape`."""
    if task.kernel == PLAIN_DIFFERENCE:
        data = _plain_difference(task, models, pool, rows)
        if data is not None:
            return data
    result = task.method.merge(task, TensorInputs(task, models, rows), pool)
    return _as_bytes(result.to(torch_dtype(task.dtype)), task, shape)


def _plain_difference(task: TensorTask, models: Mapping[str, ModelFolder],
                      pool: "Executor | None", rows: Rows | None) -> "numpy.ndarray | None":
    """`base + (x - base)` on the raw bf16 bits of those rows (no torch); None when the kernel
    cannot be used here or a difference is not finite (then the method's own arithmetic
    decides, for these rows alone: a plain difference is elementwise)."""
    base = models[task.base.model].raw(task.base.tensor, rows)
    if not task.models:
        return base  # no merged model has this tensor: mergekit writes the base's
    x = models[task.models[0].model].raw(task.models[0].tensor, rows)
    return native.plain_difference_raw(x, base, pool)


_UNSIGNED = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def _as_bytes(result: "torch.Tensor", task: TensorTask, shape: tuple[int, ...]) -> "numpy.ndarray":
    import torch

    if tuple(result.shape) != shape:  # a bug, not bad input
        raise AssertionError(f"tensor {task.name}: computed shape {tuple(result.shape)}, planned {shape}")
    signed = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[result.element_size()]
    flat = result.detach().contiguous().reshape(-1).view(signed).numpy()
    return flat.view(_UNSIGNED[result.element_size()])


def use_torch_threads(threads: int | None) -> None:
    """torch's intra-op threads (for the "method" kernel); None keeps torch's default."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
