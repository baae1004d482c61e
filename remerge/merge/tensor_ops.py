"""The merge arithmetic: small pure tensor functions, one per step.

Every function reproduces mergekit's arithmetic operation by operation, in the compute dtype
`c` (bf16 ops round once per op; `sum(dim=0)` accumulates in float32 and rounds once),
because a reproduction that computes more precisely gives different bytes. Where mergekit
0.0.5.1 and 0.1.5 differ, the `version` argument selects.

Shapes: `base` and each input are `(*shape)`; stacked task vectors are `(n, *shape)` with n
the number of merged (non-base) models in recipe order.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Executor
from typing import Any, Callable, Sequence

import torch

from remerge.merge.kernels import native
from remerge.merge.methods import LEGACY, MethodSpec


# --- sparsification: which entries of one task vector survive ------------------------------


def rank_positions(delta: torch.Tensor, descending: bool) -> torch.Tensor:
    """Flat positions of `delta` ordered by |delta| as float32, as mergekit ranks them.

    The same sort kernel as mergekit's `torch.argsort(w, descending=True)` / `torch.sort(w)`
    (torch's default sort is not stable; calling the same kernel on the same float32 keys is
    what makes ties at the cut fall the same way). Sorted in place: |delta| and int64 indices,
    12 bytes per element, no further copy.
    """
    keys = delta.abs().reshape(-1)  # a new tensor: abs() never aliases
    if keys.dtype not in (torch.bfloat16, torch.float16):
        keys = keys.float()
    # bf16 and fp16 keys are ranked as they are: their float32 values are exact and in the
    # same order, and the sort decides by comparisons alone, so the permutation is the same
    # (tested) at half the memory.
    order = torch.empty(keys.numel(), dtype=torch.int64)
    torch.sort(keys, descending=descending, out=(keys, order))
    return order


def magnitude_band(numel: int, density: float, version: str) -> tuple[bool, int, int]:
    """TIES keeps positions [0, k) of the descending ranking, k = int(density * numel)
    (at least 1 in 0.1.5). Returns (descending, lo, hi)."""
    k = int(density * numel)
    if version != LEGACY:
        k = max(1, k)
    if k == 0:  # mergekit 0.0.5.1 stops here with an assertion
        raise ValueError(f"density {density} keeps no element of a tensor of {numel}")
    return True, 0, k


def outlier_band(numel: int, density: float, gamma: float, version: str) -> tuple[bool, int, int]:
    """Breadcrumbs keeps a band of the ascending ranking: the `gamma` share of largest entries
    and the smallest ones go, `density` stays: [n_bot, n_bot + target) in 0.1.5;
    [n_bot, numel - n_top) in 0.0.5.1, whose slice `[n_bot:-n_top]` keeps nothing when n_top
    ends up 0. Returns (descending, lo, hi)."""
    target = int(density * numel)
    n_top = int(gamma * numel)
    if version == LEGACY:
        n_bot = numel - target - n_top
        if n_bot < 0:
            n_top, n_bot = n_top + n_bot, 0
        return False, n_bot, (numel - n_top if n_top else n_bot)
    n_bot = max(0, numel - target - n_top)
    return False, n_bot, n_bot + target


def band_of(method: MethodSpec, numel: int, params: dict[str, Any], version: str) -> tuple[bool, int, int]:
    if method.sparsification == "magnitude":
        return magnitude_band(numel, params["density"], version)
    return outlier_band(numel, params["density"], params["gamma"], version)


def dropped_positions(delta: torch.Tensor, band: tuple[bool, int, int]) -> torch.Tensor:
    """Flat positions outside the band of mergekit's ranking of |delta| (torch's sort)."""
    descending, lo, hi = band
    order = rank_positions(delta, descending)
    return torch.cat([order[:lo], order[hi:]])


def magnitude_dropped(delta: torch.Tensor, density: float, version: str) -> torch.Tensor:
    """Positions outside the k largest |delta|."""
    return dropped_positions(delta, magnitude_band(delta.numel(), density, version))


def outlier_dropped(delta: torch.Tensor, density: float, gamma: float, version: str) -> torch.Tensor:
    """Breadcrumbs: positions outside the kept band of ascending |delta|."""
    return dropped_positions(delta, outlier_band(delta.numel(), density, gamma, version))


def keep_mask(delta: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """0/1 mask in delta's dtype, 0 at the dropped positions."""
    mask = torch.ones(delta.numel(), dtype=delta.dtype)
    mask[dropped] = 0
    return mask.reshape(delta.shape)


def magnitude_mask(delta: torch.Tensor, density: float, version: str) -> torch.Tensor:
    """TIES: keep the k largest |delta| (ties at the cut as mergekit's argsort orders them)."""
    return keep_mask(delta, magnitude_dropped(delta, density, version))


def outlier_mask(delta: torch.Tensor, density: float, gamma: float, version: str) -> torch.Tensor:
    """Breadcrumbs' mask (see `outlier_dropped`)."""
    return keep_mask(delta, outlier_dropped(delta, density, gamma, version))


def random_mask(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, from a generator seeded per tensor.

    bf16 draws in bf16; other dtypes in float32 (torch has no fp16 bernoulli on the CPU).
    """
    work = delta.dtype if delta.dtype == torch.bfloat16 else torch.float32
    generator = torch.Generator().manual_seed(seed)
    probs = torch.full(delta.shape, density, dtype=work)
    return torch.bernoulli(probs, generator=generator)


def rescaled(delta: torch.Tensor, mask: torch.Tensor, version: str) -> torch.Tensor:
    """`delta * mask` scaled to keep the L1 norm of `delta` (skipped for tiny norms)."""
    masked = delta * mask
    before, after = delta.abs().sum(), masked.abs().sum()
    if version == LEGACY:
        if before >= 1e-8 and after >= 1e-8:
            return (delta * (before / after)) * mask
        return masked
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def tensor_seed(seed: int, tensor: str, model_index: int) -> int:
    """A 63-bit seed per (run seed, tensor, model): independent of shard layout and threads."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sparsify(
    method: MethodSpec, delta: torch.Tensor, params: dict[str, Any], rescale: bool,
    version: str, seed: int,
) -> torch.Tensor:
    """One task vector after the method's sparsification (unchanged when density >= 1)."""
    density = params["density"]
    if method.sparsification is None or density >= 1:
        return delta
    if method.sparsification == "magnitude":
        mask = magnitude_mask(delta, density, version)
    elif method.sparsification == "magnitude_outliers":
        mask = outlier_mask(delta, density, params["gamma"], version)
    else:
        mask = random_mask(delta, density, seed)
        if version == LEGACY:  # 0.0.5.1 rescales DARE by 1/density
            kept = delta.to(mask.dtype) * mask
            return (kept / density if rescale else kept).to(delta.dtype)
        return (rescaled(delta.to(mask.dtype), mask, version) if rescale
                else delta.to(mask.dtype) * mask).to(delta.dtype)
    return rescaled(delta, mask, version) if rescale else delta * mask


# --- combining task vectors ----------------------------------------------------------------


def consensus_mask(deltas: torch.Tensor, int8: bool) -> torch.Tensor:
    """TIES sign election ("sum"): True where an entry's sign matches the weighted majority.

    deltas: (n, *shape), already weighted. Zero entries never match (sign 0 vs +-1).
    `int8` only changes the mask's memory, not the result.
    """
    mask_dtype = torch.int8 if int8 else deltas.dtype
    sign = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1  # (*shape)
    return sign == majority


def masked_weight_sum(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(w * mask).sum(dim=0)` before its final rounding, without the (n, *shape) product:
    float32 accumulation over the models in order, as torch's sum over dim 0 does."""
    acc = torch.zeros(mask.shape[1:], dtype=torch.float32)
    for i in range(mask.shape[0]):
        acc.add_(mask[i], alpha=float(w[i]))
    return acc


def weight_column(weights: Sequence[float], dtype: torch.dtype, ndim: int) -> torch.Tensor:
    """Weights as a (n, 1, ..., 1) tensor of the compute dtype: 0.3 becomes 0.30078125 in bf16."""
    return torch.tensor(list(weights), dtype=dtype).reshape(-1, *([1] * ndim))


def combine(
    method: MethodSpec, base: torch.Tensor, deltas: torch.Tensor, weights: Sequence[float],
    shared: dict[str, Any],
) -> torch.Tensor:
    """Weight the (sparsified) task vectors, elect signs, mix, normalize, add to the base.

    deltas: (n, *shape) in base's dtype; modified in place.
    """
    w = weight_column(weights, deltas.dtype, base.ndim)  # (n, 1, ..., 1)
    if not bool((w == 1).all()):  # x * 1 is exact: skip the pass
        deltas.mul_(w)
    if method.consensus:
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
    if shared.get("lambda", 1.0) != 1:
        mixed *= shared["lambda"]
    return (base + mixed).to(base.dtype)


def task_arithmetic(
    method: MethodSpec,
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    params: Sequence[dict[str, Any]],
    shared: dict[str, Any],
    version: str,
    seeds: Sequence[int],
) -> torch.Tensor:
    """Generalized task arithmetic (TIES, DARE, breadcrumbs...) of one tensor, in base's dtype:
    the reference form, step by step as mergekit computes it."""
    if not inputs:
        return base
    deltas = base.new_empty((len(inputs), *base.shape))  # (n, *shape)
    for i, (x, p) in enumerate(zip(inputs, params)):
        deltas[i] = sparsify(method, x - base, p, shared["rescale"], version, seeds[i])
    return combine(method, base, deltas, [p["weight"] for p in params], shared)


def is_plain_difference(
    method: MethodSpec, base: torch.Tensor, params: Sequence[dict[str, Any]], shared: dict[str, Any],
) -> bool:
    """One model, weight exactly 1 in the compute dtype, no sparsification, no lambda: then
    the whole computation is `base + (x - base)` in the compute dtype, bit for bit.

    (Sign election keeps every nonzero entry; normalizing divides by the weight 1; the entries
    it drops are zeros, and a dropped -0 can only arise where base is +0, where adding +0 or
    -0 gives the same +0.)
    """
    if len(params) != 1 or shared.get("lambda", 1.0) != 1:
        return False
    p = params[0]
    if method.sparsification is not None and p.get("density", 1.0) < 1:
        return False
    return weight_column([p["weight"]], base.dtype, 0).item() == 1


def sparsify_(
    method: MethodSpec, delta: torch.Tensor, params: dict[str, Any], rescale: bool,
    version: str, seed: int,
) -> None:
    """`sparsify` in place on a contiguous task vector, without building a mask.

    Dropped entries become +0 where `delta * mask` gives -0 for negative entries; every use
    of a task vector ends in a sum over models, which starts from +0, so the sign of a zero
    never reaches the result.
    """
    density = params["density"]
    if method.sparsification is None or density >= 1:
        return
    if method.sparsification == "random":
        delta.copy_(sparsify(method, delta, params, rescale, version, seed))
        return
    band = band_of(method, delta.numel(), params, version)
    before = delta.abs().sum() if rescale else None
    if not native.zero_outside(delta, *band):  # the same entries, ranked by torch's sort
        delta.view(-1)[dropped_positions(delta, band)] = 0
    if rescale:
        after = delta.abs().sum()
        if version == LEGACY:
            if before >= 1e-8 and after >= 1e-8:
                delta.mul_(before / after)
        elif not (before < 1e-7 or after < 1e-7):
            delta.mul_(before / after)


SORT_BYTES_PER_ELEMENT = 20  # torch's sort: keys, int64 order and its own buffer (the kernel: 6-8)
PARALLEL_SORT_BYTES = 256 * 1024**2


def task_arithmetic_streamed(
    method: MethodSpec,
    load_base: Callable[[], torch.Tensor],
    loaders: Sequence[Callable[[], torch.Tensor]],
    params: Sequence[dict[str, Any]],
    shared: dict[str, Any],
    version: str,
    seeds: Sequence[int],
    pool: Executor | None = None,
) -> torch.Tensor:
    """`task_arithmetic`, bit for bit, with less work and memory: inputs are read one at a
    time into the stacked task vectors, sparsified in place (in parallel on `pool` when the
    sorts fit in memory), the base is read again after the sorts rather than held through
    them, and the one-model weight-1 case is two passes."""
    base = load_base()
    if not loaders:
        return base
    first = loaders[0]()  # inputs may be read-only views of the files: never written to
    if is_plain_difference(method, base, params, shared):
        fused = native.plain_difference(first, base, pool)
        if fused is not None:
            return fused
        delta = torch.sub(first, base)
        # A finite sum means no NaN or inf anywhere; those take the step-by-step path.
        if bool(torch.isfinite(delta.sum())):  # (an overflowing sum only costs the slow path)
            return delta.add_(base)  # base + (x - base): addition commutes bit for bit
    deltas = base.new_empty((len(loaders), *base.shape))  # (n, *shape)
    torch.sub(first, base, out=deltas[0])
    del first
    for i, load in enumerate(loaders[1:], 1):
        torch.sub(load(), base, out=deltas[i])
    jobs = [(deltas[i], params[i], seeds[i]) for i in range(len(loaders))]
    run = lambda job: sparsify_(method, job[0], job[1], shared["rescale"], version, job[2])  # noqa: E731
    # A sort holds 12 bytes per element (float32 keys + int64 order): sort large tensors one
    # model at a time, so that memory stays near one tensor's working set.
    numel = base.numel()
    if method.sparsification is not None:
        del base  # not needed through the sorts: read again below
    parallel = pool is not None and SORT_BYTES_PER_ELEMENT * numel * len(jobs) <= PARALLEL_SORT_BYTES
    list(pool.map(run, jobs) if parallel else map(run, jobs))
    base = load_base() if method.sparsification is not None else base
    return combine(method, base, deltas, [p["weight"] for p in params], shared)


def linear(
    inputs: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool, version: str
) -> torch.Tensor:
    """Weighted average. 0.1.5 accumulates in float32 (float64 for float64 inputs) and casts
    back; 0.0.5.1 computes `(w * x).sum(0) / w.sum(0)` in the inputs' dtype."""
    first = inputs[0]
    if version == LEGACY:
        stacked = torch.stack(list(inputs), dim=0)  # (n, *shape)
        w = weight_column(weights, stacked.dtype, first.ndim)
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
