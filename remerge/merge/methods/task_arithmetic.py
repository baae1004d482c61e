"""Generalized task arithmetic: task_arithmetic, TIES, DARE, breadcrumbs and DELLA (mergekit's
`generalized_task_arithmetic.py`).

Per output tensor, in the compute dtype `c` (bf16 ops round once per op; `sum(dim=0)`
accumulates in float32 and rounds once), as mergekit computes it:

    d_i = x_i - base                    task vector of each merged model, recipe order
    d_i = sparsify(d_i)                 magnitude / random / outlier band (`sparsify.py`)
    D   = stack(d_i) * w                w = tensor(weights, dtype=c): 0.3 is 0.30078125 in bf16
    m   = sign(D) == majority sign      TIES only ("sum" election); else m = 1
    out = base + lambda * (sum(D * m) / sum(w * m) if normalize else sum(D * m))

Shapes: `base` and each input `(*shape)`; stacked task vectors `(n, *shape)`, n = merged models.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from remerge.lazy import lazy_import
from remerge.merge.methods import REQUIRED, MethodSpec, Parameter
from remerge.errors import RecipeError
from remerge.merge.kernels import native
from remerge.merge.methods.sparsify import RANDOM_KINDS, sparsifies, sparsify, sparsify_

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import torch

    from remerge.merge.releases import Release
    from remerge.merge.tensor import TensorInputs, TensorTask
else:
    torch = lazy_import("torch")


@dataclass(frozen=True)
class Steps:
    """What distinguishes the methods of the family."""

    sparsification: str | None  # "magnitude" | "random" | "magnitude_outliers" | "della_magprune" | None
    consensus: bool  # TIES sign election ("sum")


# --- combining task vectors ----------------------------------------------------------------


def consensus_mask(deltas: "torch.Tensor", int8: bool) -> "torch.Tensor":
    """TIES sign election ("sum"): True where an entry's sign matches the weighted majority.

    deltas: (n, *shape), already weighted. Zero entries never match (sign 0 vs +-1).
    `int8` only changes the mask's memory, not the result.
    """
    mask_dtype = torch.int8 if int8 else deltas.dtype
    sign = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1  # (*shape)
    return sign == majority


def masked_weight_sum(w: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    """`(w * mask).sum(dim=0)` before its final rounding, without the (n, *shape) product:
    float32 accumulation over the models in order, as torch's sum over dim 0 does."""
    acc = torch.zeros(mask.shape[1:], dtype=torch.float32)
    for i in range(mask.shape[0]):
        acc.add_(mask[i], alpha=float(w[i]))
    return acc


def weight_column(weights: Sequence[float], dtype: "torch.dtype", ndim: int) -> "torch.Tensor":
    """Weights as a (n, 1, ..., 1) tensor of the compute dtype: 0.3 becomes 0.30078125 in bf16."""
    return torch.tensor(list(weights), dtype=dtype).reshape(-1, *([1] * ndim))


def combine(steps: Steps, base: "torch.Tensor", deltas: "torch.Tensor", weights: Sequence[float],
            shared: Mapping[str, Any]) -> "torch.Tensor":
    """Weight the (sparsified) task vectors, elect signs, mix, normalize, add to the base.

    deltas: (n, *shape) in base's dtype; modified in place.
    """
    w = weight_column(weights, deltas.dtype, base.ndim)  # (n, 1, ..., 1)
    if not bool((w == 1).all()):  # x * 1 is exact: skip the pass
        deltas.mul_(w)
    if steps.consensus:
        mask = consensus_mask(deltas, shared["int8_mask"])  # (n, *shape) bool
        divisor = masked_weight_sum(w, mask).to(deltas.dtype)
        deltas.mul_(mask)  # in place: the same values as `deltas * mask`
        del mask
        mixed = deltas.sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if shared["normalize"]:
        mixed /= divisor
    if shared["lambda"] != 1:
        mixed *= shared["lambda"]
    return (base + mixed).to(base.dtype)


def _fixed_divisor(weights: Sequence[float], dtype: "torch.dtype") -> float:
    """What `combine` divides by without sign election: the weights' sum in the compute
    dtype, 1 where it is (nearly) zero."""
    divisor = weight_column(weights, dtype, 0).sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    return float(divisor)


_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
COMBINE_ARGS = [_P, _I64, _INT, _P, _INT, _INT, _F, _INT, _F, _P, _P, _I64]
FUSED_MAX_MODELS = 64


def _fused(fn: Any, steps: Steps, base: "torch.Tensor", deltas: "torch.Tensor",
           weights: Sequence[float], shared: Mapping[str, Any], pool: "Executor | None" = None,
           chunks: int = 2) -> "torch.Tensor | None":
    """`combine` in one pass of the compiled kernel (bf16 only), on `chunks` parts of the
    elements in parallel on `pool`; None where the kernel leaves it to torch (non-finite
    values). deltas: (n, *shape) contiguous, read only."""
    n, numel = deltas.shape[0], base.numel()
    w_bf16 = weight_column(weights, torch.bfloat16, 0).float()  # the weights as bf16 rounds them
    w = (ctypes.c_float * n)(*w_bf16.tolist())
    fixed = 0.0 if steps.consensus else _fixed_divisor(weights, torch.bfloat16)
    lam = shared["lambda"]
    out = torch.empty_like(base)
    d, b, o = deltas.data_ptr(), base.data_ptr(), out.data_ptr()

    def run(part: tuple[int, int]) -> int:
        lo, hi = part
        return fn(d + 2 * lo, numel, n, w, int(steps.consensus), int(shared["normalize"]),
                  fixed, int(lam != 1), lam, b + 2 * lo, o + 2 * lo, hi - lo)

    return out if native.run_parts(run, numel, pool, chunks) else None


def _combine_agrees(fn: Any) -> bool:
    """The kernel against `combine` (torch's own steps) on ordinary, tiny and huge values,
    with and without sign election, weights, normalizing and lambda."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1e-39, 1e-3, 1.0, 3e37]).repeat_interleave(4096)
    base = (torch.randn(scale.numel(), generator=g) * scale).bfloat16()
    deltas = (torch.randn(3, scale.numel(), generator=g) * scale).bfloat16()
    deltas[torch.rand(deltas.shape, generator=g) < 0.3] = 0
    cases = [(Steps("magnitude", True), [0.5, 0.3, 0.2], True, 1.0),
             (Steps("magnitude", True), [1.0, 1.0, 1.0], False, 0.7),
             (Steps(None, False), [0.3, 0.3, 0.7], True, 1.3)]
    for steps, weights, normalize, lam in cases:
        shared = {"int8_mask": False, "normalize": normalize, "lambda": lam}
        expected = combine(steps, base, deltas.clone(), weights, shared)
        ours = _fused(fn, steps, base, deltas, weights, shared, chunks=1)
        if ours is None or not torch.equal(ours.view(torch.int16), expected.view(torch.int16)):
            return False
    return True


@lru_cache(maxsize=1)
def combine_kernel() -> Any:
    """The compiled bf16 `combine`, checked against torch on this machine; None without it."""
    return native.verified("remerge_combine_bf16", COMBINE_ARGS, _combine_agrees)


def fused_combine(steps: Steps, base: "torch.Tensor", deltas: "torch.Tensor",
                  weights: Sequence[float], shared: Mapping[str, Any],
                  pool: "Executor | None" = None) -> "torch.Tensor | None":
    """`combine`, bit for bit, in one pass over memory instead of about ten where the kernel
    applies (bf16 task vectors and base, at most 64 models); None elsewhere."""
    if base.dtype != torch.bfloat16 or deltas.dtype != torch.bfloat16 or not 0 < len(weights) <= FUSED_MAX_MODELS:
        return None
    if not (base.is_contiguous() and deltas.is_contiguous()):
        return None
    fn = combine_kernel()
    return None if fn is None else _fused(fn, steps, base, deltas, weights, shared, pool)


# --- one tensor ------------------------------------------------------------------------------


def reference(steps: Steps, base: "torch.Tensor", inputs: Sequence["torch.Tensor"],
              params: Sequence[Mapping[str, Any]], shared: Mapping[str, Any], release: "Release",
              seeds: Sequence[int]) -> "torch.Tensor":
    """One tensor, step by step as mergekit computes it (the test oracle of `merge`)."""
    if not inputs:
        return base
    deltas = base.new_empty((len(inputs), *base.shape))  # (n, *shape)
    for i, (x, p) in enumerate(zip(inputs, params)):
        deltas[i] = sparsify(steps.sparsification, x - base, p, shared["rescale"], release, seeds[i])
    return combine(steps, base, deltas, [p["weight"] for p in params], shared)


def is_plain_difference(steps: Steps, task: "TensorTask") -> bool:
    """At most one merged model, weight exactly 1, nothing dropped, no lambda: then the whole
    computation is `base + (x - base)` in the compute dtype, bit for bit.

    (Sign election keeps every nonzero entry; normalizing divides by the weight 1; the entries
    it drops are zeros, and a dropped -0 can only arise where base is +0, where adding +0 or
    -0 gives the same +0. A weight that only rounds to 1 in the compute dtype takes the
    general path, which gives the same bytes.)
    """
    if len(task.params) > 1 or task.shared["lambda"] != 1:
        return False
    return all(p["weight"] == 1.0 and not sparsifies(steps.sparsification, p) for p in task.params)


def check_della(steps: Steps, task: "TensorTask") -> None:
    """DELLA's keep probabilities density +/- epsilon must lie in (0, 1), for every model
    whose task vector is pruned (mergekit checks it when it prunes)."""
    if steps.sparsification != "della_magprune":
        return
    for src, p in zip(task.models, task.params):
        d, e = p["density"], p["epsilon"]
        if sparsifies(steps.sparsification, p) and (d + e >= 1 or d - e <= 0):
            raise RecipeError(
                f"tensor {task.name} of model {src.model}: density {d:g} +/- epsilon {e:g} must lie "
                "in (0, 1) (mergekit: 'Epsilon must be chosen such that density +/- epsilon is "
                "in (0, 1)'); lower epsilon")


SORT_BYTES_PER_ELEMENT = 20  # torch's sort: keys, int64 order and its own buffer (the kernel: 6-8)
PARALLEL_SORT_BYTES = 256 * 1024**2


def merge(steps: Steps, task: "TensorTask", inputs: "TensorInputs",
          pool: "Executor | None" = None) -> "torch.Tensor":
    """`reference`, bit for bit, with less work and memory: inputs are read one at a time into
    the stacked task vectors, sparsified in place (in parallel on `pool` when the sorts fit
    in memory), the base is read again after the sorts rather than held through them, and a
    plain difference is two passes."""
    check_della(steps, task)
    base = inputs.base()
    n = len(task.params)
    if n == 0:
        return base
    first = inputs.model(0)  # inputs may be read-only views of the files: never written to
    if is_plain_difference(steps, task):
        delta = torch.sub(first, base)
        # A finite sum means no NaN or inf anywhere; those take the step-by-step path.
        if bool(torch.isfinite(delta.sum())):  # (an overflowing sum only costs the slow path)
            return delta.add_(base)  # base + (x - base): addition commutes bit for bit
    deltas = base.new_empty((n, *base.shape))  # (n, *shape)
    torch.sub(first, base, out=deltas[0])
    del first
    for i in range(1, n):
        torch.sub(inputs.model(i), base, out=deltas[i])
    kind, rescale = steps.sparsification, task.shared["rescale"]
    jobs = [(deltas[i], task.params[i], task.seeds[i]) for i in range(n)]
    # A sort holds 12 bytes per element (float32 keys + int64 order): sort large tensors one
    # model at a time, so that memory stays near one tensor's working set.
    numel = base.numel()
    if kind is not None:
        del base  # not needed through the sorts: read again below
    parallel = pool is not None and SORT_BYTES_PER_ELEMENT * numel * n <= PARALLEL_SORT_BYTES
    inner = None if parallel else pool  # one model at a time: its DELLA ranks use the pool instead

    def run(job: tuple) -> None:
        sparsify_(kind, job[0], job[1], rescale, task.release, job[2], inner)

    list(pool.map(run, jobs) if parallel else map(run, jobs))
    base = inputs.base() if kind is not None else base
    weights = [p["weight"] for p in task.params]
    fused = fused_combine(steps, base, deltas, weights, task.shared, pool)
    return fused if fused is not None else combine(steps, base, deltas, weights, task.shared)


# --- the methods -------------------------------------------------------------------------------

TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"

WEIGHT = Parameter("weight", "model", REQUIRED, doc="scale of the model's task vector")
DENSITY = Parameter("density", "model", 1.0, valid=lambda v: 0 < v <= 1, allowed="in (0, 1]",
                    doc="share of the task vector's entries kept")
GAMMA = Parameter("gamma", "model", 0.01, valid=lambda v: 0 <= v < 1, allowed="in [0, 1)",
                  doc="share of the largest entries dropped as outliers")
INT8_MASK = Parameter("int8_mask", "global", False, kind="flag",
                      doc="store the sign masks as int8 (memory only; same bytes)")
EPSILON = Parameter("epsilon", "model", 0.15,
                    doc="keep probabilities range over density +/- epsilon by magnitude rank")
LAMBDA = Parameter("lambda", "global", 1.0, release_flag="task_arithmetic_lambda",
                   doc="scale of the merged task vector (ignored before mergekit 0.1)")


def _spec(name: str, pretty: str, paper: str, steps: Steps, normalize: bool, rescale: bool) -> MethodSpec:
    extra = {"magnitude_outliers": (GAMMA,), "della_magprune": (EPSILON,)}.get(steps.sparsification, ())
    per_model = (WEIGHT, DENSITY) + extra
    flags = (
        INT8_MASK,
        Parameter("normalize", "global", normalize, kind="flag",
                  doc="divide by the sum of the weights (of the agreeing models for TIES)"),
        Parameter("rescale", "global", rescale, kind="flag",
                  doc="rescale kept entries to the task vector's L1 norm"),
        LAMBDA,
    )
    return MethodSpec(
        name=name, pretty_name=pretty, paper=paper, family=__name__, parameters=per_model + flags,
        base="required", random=steps.sparsification in RANDOM_KINDS, merge=partial(merge, steps),
        is_plain_difference=partial(is_plain_difference, steps),
        is_elementwise=partial(is_elementwise, steps),
    )


# what distinguishes each method of the family, by name (the audit of random merges reads it)
STEPS = {
    "ties": Steps("magnitude", True),
    "task_arithmetic": Steps(None, False),
    "breadcrumbs": Steps("magnitude_outliers", False),
    "breadcrumbs_ties": Steps("magnitude_outliers", True),
    "dare_ties": Steps("random", True),
    "dare_linear": Steps("random", False),
    "della": Steps("della_magprune", True),
    "della_linear": Steps("della_magprune", False),
}


def is_elementwise(steps: Steps, task: "TensorTask") -> bool:
    """No model's task vector is sparsified (density 1 for all, or no sparsification): then
    every step is per element (differences, weights, TIES' sign election and its masked
    weight sum are per element across the models; normalize and lambda too), and no random
    number is drawn. A magnitude cut, an L1 rescale or a DELLA rank needs the whole tensor."""
    return not any(sparsifies(steps.sparsification, p) for p in task.params)


SPECS = (
    _spec("ties", "TIES", TIES_PAPER, STEPS["ties"], normalize=True, rescale=False),
    _spec("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
          STEPS["task_arithmetic"], normalize=False, rescale=False),
    _spec("breadcrumbs", "Model Breadcrumbs", BREADCRUMBS_PAPER,
          STEPS["breadcrumbs"], normalize=False, rescale=False),
    _spec("breadcrumbs_ties", "Model Breadcrumbs with TIES", BREADCRUMBS_PAPER,
          STEPS["breadcrumbs_ties"], normalize=False, rescale=False),
    _spec("dare_ties", "DARE TIES", DARE_PAPER, STEPS["dare_ties"], normalize=False, rescale=True),
    _spec("dare_linear", "Linear DARE", DARE_PAPER, STEPS["dare_linear"], normalize=False, rescale=True),
    _spec("della", "DELLA", DELLA_PAPER, STEPS["della"], normalize=True, rescale=True),
    _spec("della_linear", "Linear DELLA", DELLA_PAPER, STEPS["della_linear"],
          normalize=False, rescale=True),
)
