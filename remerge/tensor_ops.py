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
from typing import Any, Sequence

import torch

from remerge.methods import LEGACY, MethodSpec


# --- sparsification: which entries of one task vector survive ------------------------------


def _magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|delta| flattened, as float32 (mergekit ranks CPU magnitudes in float32)."""
    return delta.abs().reshape(-1).float()


def magnitude_mask(delta: torch.Tensor, density: float, version: str) -> torch.Tensor:
    """0/1 mask (dtype of delta) keeping the k largest |delta|, k = int(density * numel).

    Ties at the cut follow torch's descending argsort, exactly as mergekit ranks them.
    """
    k = int(density * delta.numel())
    if version != LEGACY:
        k = max(1, k)
    if k == 0:  # mergekit 0.0.5.1 stops here with an assertion
        raise ValueError(f"density {density} keeps no element of a tensor of {delta.numel()}")
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.argsort(_magnitudes(delta), descending=True)[:k]] = 1
    return mask.reshape(delta.shape)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float, version: str) -> torch.Tensor:
    """Breadcrumbs: drop the `gamma` share of largest |delta| and the smallest, keep `density`.

    Ascending rank order; the kept band is [n_bot, n_bot + target) (0.1.5) or
    [n_bot, numel - n_top) (0.0.5.1, which keeps nothing when n_top ends up 0).
    """
    numel = delta.numel()
    target = int(density * numel)
    n_top = int(gamma * numel)
    order = torch.sort(_magnitudes(delta), descending=False).indices
    if version == LEGACY:
        n_bot = numel - target - n_top
        if n_bot < 0:
            n_top, n_bot = n_top + n_bot, 0
        kept = order[n_bot:-n_top]  # an empty slice when n_top == 0, as in 0.0.5.1
    else:
        n_bot = max(0, numel - target - n_top)
        kept = order[n_bot : n_bot + target]
    mask = torch.zeros(numel, dtype=delta.dtype)
    mask[kept] = 1
    return mask.reshape(delta.shape)


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


def weight_column(weights: Sequence[float], dtype: torch.dtype, ndim: int) -> torch.Tensor:
    """Weights as a (n, 1, ..., 1) tensor of the compute dtype: 0.3 becomes 0.30078125 in bf16."""
    return torch.tensor(list(weights), dtype=dtype).reshape(-1, *([1] * ndim))


def task_arithmetic(
    method: MethodSpec,
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    params: Sequence[dict[str, Any]],
    shared: dict[str, Any],
    version: str,
    seeds: Sequence[int],
) -> torch.Tensor:
    """Generalized task arithmetic (TIES, DARE, breadcrumbs...) of one tensor, in base's dtype."""
    if not inputs:
        return base
    deltas = base.new_empty((len(inputs), *base.shape))  # (n, *shape)
    for i, (x, p) in enumerate(zip(inputs, params)):
        deltas[i] = sparsify(method, x - base, p, shared["rescale"], version, seeds[i])
    weights = weight_column([p["weight"] for p in params], deltas.dtype, base.ndim)
    deltas.mul_(weights)
    if method.consensus:
        mask = consensus_mask(deltas, shared["int8_mask"])
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if shared["normalize"]:
        mixed /= divisor
    if shared.get("lambda", 1.0) != 1:
        mixed *= shared["lambda"]
    return (base + mixed).to(base.dtype)


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
