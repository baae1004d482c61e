"""Sparsification: which entries of one task vector survive, as mergekit decides it.

Four kinds, named as mergekit names them: "magnitude" (TIES: the k largest |delta|),
"magnitude_outliers" (breadcrumbs: a band of the ranking, without the largest and smallest),
"random" (DARE: each entry kept with probability `density`), "della_magprune" (DELLA: kept
with a probability that grows with the entry's magnitude rank in its row). Ties at a
magnitude cut are decided by torch's sort order, so ranking uses the same kernel on the
same keys.

Shapes: `delta` is one task vector, `(*shape)`, in the compute dtype.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Mapping

from remerge.errors import RecipeError
from remerge.lazy import lazy_import
from remerge.merge.kernels import native

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import torch

    from remerge.merge.releases import Release
else:
    torch = lazy_import("torch")

# A band of mergekit's ranking of |delta|: (descending?, first kept position, end of the kept)
Band = tuple[bool, int, int]


def sparsifies(kind: str | None, params: Mapping[str, Any]) -> bool:
    """Whether a task vector with these parameters loses any entry (density >= 1 keeps all)."""
    return kind is not None and params["density"] < 1


RANDOM_KINDS = ("random", "della_magprune")


# --- the kept band of the ranking ------------------------------------------------------------


def magnitude_band(numel: int, density: float, release: "Release") -> Band:
    """TIES keeps positions [0, k) of the descending ranking, k = int(density * numel)
    (at least 1 where the release says so)."""
    k = int(density * numel)
    if release.topk_at_least_one:
        k = max(1, k)
    if k == 0:  # mergekit 0.0.5.1 stops here with an assertion
        raise RecipeError(f"density {density} keeps no element of a tensor of {numel} elements "
                          f"(mergekit {release.version} refuses it); raise the density")
    return True, 0, k


def outlier_band(numel: int, density: float, gamma: float, release: "Release") -> Band:
    """Breadcrumbs keeps a band of the ascending ranking: the `gamma` share of largest entries
    and the smallest ones go, `density` stays: [n_bot, n_bot + target) ("target"), or
    [n_bot, numel - n_top) ("slice": the slice `[n_bot:-n_top]`, empty when n_top ends up 0)."""
    target = int(density * numel)
    n_top = int(gamma * numel)
    if release.breadcrumbs_band == "slice":
        n_bot = numel - target - n_top
        if n_bot < 0:
            n_top, n_bot = n_top + n_bot, 0
        return False, n_bot, (numel - n_top if n_top else n_bot)
    n_bot = max(0, numel - target - n_top)
    return False, n_bot, n_bot + target


def band_of(kind: str, numel: int, params: Mapping[str, Any], release: "Release") -> Band:
    if kind == "magnitude":
        return magnitude_band(numel, params["density"], release)
    return outlier_band(numel, params["density"], params["gamma"], release)


# --- masks (the reference form) -----------------------------------------------------------


def rank_positions(delta: "torch.Tensor", descending: bool) -> "torch.Tensor":
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


def dropped_positions(delta: "torch.Tensor", band: Band) -> "torch.Tensor":
    """Flat positions outside the band of mergekit's ranking of |delta| (torch's sort)."""
    descending, lo, hi = band
    order = rank_positions(delta, descending)
    return torch.cat([order[:lo], order[hi:]])


def keep_mask(delta: "torch.Tensor", dropped: "torch.Tensor") -> "torch.Tensor":
    """0/1 mask in delta's dtype, 0 at the dropped positions."""
    mask = torch.ones(delta.numel(), dtype=delta.dtype)
    mask[dropped] = 0
    return mask.reshape(delta.shape)


def magnitude_mask(delta: "torch.Tensor", density: float, release: "Release") -> "torch.Tensor":
    """TIES: keep the k largest |delta| (ties at the cut as mergekit's argsort orders them)."""
    return keep_mask(delta, dropped_positions(delta, magnitude_band(delta.numel(), density, release)))


def outlier_mask(delta: "torch.Tensor", density: float, gamma: float, release: "Release") -> "torch.Tensor":
    """Breadcrumbs' mask (see `outlier_band`)."""
    band = outlier_band(delta.numel(), density, gamma, release)
    return keep_mask(delta, dropped_positions(delta, band))


def work_dtype(dtype: "torch.dtype") -> "torch.dtype":
    """The dtype DARE and DELLA draw, mask and rescale in: bf16 stays bf16, any other dtype
    becomes float32 (mergekit on the CPU: torch has no fp16 bernoulli there)."""
    return dtype if dtype == torch.bfloat16 else torch.float32


def dare_probabilities(delta: "torch.Tensor", density: float) -> "torch.Tensor":
    """DARE's keep probability of each entry: `density` in the work dtype (so 0.7 is
    0.69921875 for bf16 deltas). Shape of `delta`."""
    return torch.full(delta.shape, density, dtype=work_dtype(delta.dtype))


def random_mask(delta: "torch.Tensor", density: float, seed: int) -> "torch.Tensor":
    """DARE: keep each entry with probability `density`, from a generator seeded per tensor.

    bf16 draws in bf16; other dtypes in float32 (torch has no fp16 bernoulli on the CPU).
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(dare_probabilities(delta, density), generator=generator)


def della_rows(delta: "torch.Tensor") -> "torch.Tensor":
    """The rows DELLA ranks within: the tensor itself, a 1-D one as a single row (a view)."""
    return delta if delta.dim() >= 2 else delta.unsqueeze(0)


def della_probabilities(delta: "torch.Tensor", density: float, epsilon: float,
                        pool: "Executor | None" = None) -> "torch.Tensor":
    """DELLA's keep probability of each entry of a row: density - epsilon (smallest |delta|
    of the row) to density + epsilon (largest), linear in its rank (ties ranked by torch's
    sort, as mergekit's). In bf16 for bf16 deltas (coarse ranks, as mergekit's), else
    float32. `delta` is at least 2-D here: (rows, n); the result has its shape."""
    work = work_dtype(delta.dtype)
    if delta.shape[-1] < 2:
        raise RecipeError(f"della cannot rank rows of one element ({list(delta.shape)}); "
                          "mergekit 0.1.5 fails on such a tensor too (torch: 'Expected p_in >= 0')")
    ranks = native.rank_rows(delta, descending=False, pool=pool)
    if ranks is None:  # torch's own: the same ranks
        ranks = torch.argsort(delta.abs(), dim=1, descending=False).argsort(dim=1)
    ranks = ranks.to(work) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    position = ((ranks - low) / (high - low)).clamp(0, 1)
    return (density - epsilon) + position * 2 * epsilon


def della_mask(delta: "torch.Tensor", density: float, epsilon: float, seed: int) -> "torch.Tensor":
    """DELLA: each entry kept with its `della_probabilities`. `delta`: (rows, n)."""
    probs = della_probabilities(delta, density, epsilon)
    return torch.bernoulli(probs, generator=torch.Generator().manual_seed(seed)).to(probs.dtype)


def _ratio_applies(before: "torch.Tensor", after: "torch.Tensor", release: "Release") -> bool:
    """Whether to rescale, by the release's test of the L1 norms (they differ for NaN)."""
    low = release.rescale_min_norm
    if release.rescale == "scale_then_mask":
        return bool(before >= low and after >= low)
    return not bool(before < low or after < low)


def rescale_rule(kind: str | None, rescale: bool, release: "Release") -> str | None:
    """How the kept entries of a task vector are rescaled: None (not at all), "l1_ratio"
    (times |delta|_1 / |delta * mask|_1) or "inverse_density" (divided by the density:
    DARE where the release says so)."""
    if not rescale:
        return None
    return release.dare_rescale if kind == "random" else "l1_ratio"


def l1_ratio(delta: "torch.Tensor", masked: "torch.Tensor", release: "Release") -> "torch.Tensor | None":
    """|delta|_1 / |masked|_1 as a 0-d tensor of delta's dtype (each sum accumulated in
    float32 and rounded once), or None where the release's test of the norms skips it."""
    before, after = delta.abs().sum(), masked.abs().sum()
    return before / after if _ratio_applies(before, after, release) else None


def kept_entries(values: "torch.Tensor", rule: str | None, density: float | None = None,
                 ratio: "torch.Tensor | None" = None) -> "torch.Tensor":
    """What the entries of a task vector are where its mask keeps them: `values` (the
    entries, masked or not: a kept entry is itself times 1, exactly) rescaled by `rule`
    (`rescale_rule`): unchanged, divided by `density`, or times `ratio` (`l1_ratio`: a 0-d
    tensor, or one per entry, of values' dtype; None: the release skipped the rescale). One
    rounding to values' dtype. The audit of random merges computes the candidates' values
    with it (`remerge.provenance.elementwise`)."""
    if rule == "inverse_density":
        return values / density
    if rule == "l1_ratio" and ratio is not None:
        return values * ratio
    return values


def rescaled(delta: "torch.Tensor", mask: "torch.Tensor", release: "Release") -> "torch.Tensor":
    """`delta * mask` scaled to keep the L1 norm of `delta` (skipped for tiny norms)."""
    masked = delta * mask
    ratio = l1_ratio(delta, masked, release)
    if ratio is None:
        return masked
    if release.rescale == "scale_then_mask":
        return kept_entries(delta, "l1_ratio", ratio=ratio) * mask
    return kept_entries(masked, "l1_ratio", ratio=ratio)


def _masked(kept: "torch.Tensor", mask: "torch.Tensor", rule: str | None, density: float,
            release: "Release") -> "torch.Tensor":
    """A random kind's task vector (in the work dtype) after its mask and rescale."""
    if rule == "l1_ratio":
        return rescaled(kept, mask, release)
    return kept_entries(kept * mask, rule, density)


def sparsify(kind: str | None, delta: "torch.Tensor", params: Mapping[str, Any], rescale: bool,
             release: "Release", seed: int) -> "torch.Tensor":
    """One task vector after sparsification (unchanged when nothing is dropped): the
    reference form, step by step as mergekit computes it."""
    if not sparsifies(kind, params):
        return delta
    density = params["density"]
    rule = rescale_rule(kind, rescale, release)
    if kind == "della_magprune":
        rows = della_rows(delta)
        mask = della_mask(rows, density, params["epsilon"], seed)
        out = _masked(rows.to(mask.dtype), mask, rule, density, release)
        return out.to(delta.dtype).reshape(delta.shape)
    if kind == "random":
        mask = random_mask(delta, density, seed)
        return _masked(delta.to(mask.dtype), mask, rule, density, release).to(delta.dtype)
    if kind == "magnitude":
        mask = magnitude_mask(delta, density, release)
    else:
        mask = outlier_mask(delta, density, params["gamma"], release)
    return rescaled(delta, mask, release) if rescale else delta * mask


# --- the compiled DARE draw ------------------------------------------------------------------

def _dare_agrees(fn: Any) -> bool:
    """The kernel against `sparsify` (torch's bernoulli and ops) on a bf16 task vector."""
    delta = torch.randn(70_001, generator=torch.Generator().manual_seed(0)) * 1e-3
    delta[::7] *= 1e-35  # subnormal in bf16
    delta[::11] = 3e38  # near bf16's largest
    delta = delta.bfloat16()
    for density, rule, seed in ((0.5, None, 1), (0.7, "inverse_density", 2**40 + 3), (0.1, "inverse_density", 0)):
        expected = _masked(delta.clone(), random_mask(delta, density, seed), rule, density, None)
        ours = delta.clone()
        p = float(dare_probabilities(delta[:1], density))
        if fn(ours.data_ptr(), ours.numel(), seed, p, None, int(rule == "inverse_density"), density) != 0 \
                or not torch.equal(ours.view(torch.int16), expected.view(torch.int16)):
            return False
    return True


@lru_cache(maxsize=1)
def dare_kernel() -> Any:
    """The compiled bf16 DARE draw and rescale, checked against torch; None without it."""
    c = ctypes
    return native.verified("remerge_dare_bf16", [c.c_void_p, c.c_int64, c.c_uint64, c.c_float, c.c_void_p, c.c_int,
                                                 c.c_float], _dare_agrees)


def dare_(delta: "torch.Tensor", density: float, rule: str | None, seed: int, release: "Release",
          probs: "torch.Tensor | None" = None) -> bool:
    """DARE on a contiguous bf16 task vector in place, by the compiled kernel: the same draws
    (torch's MT19937 stream of the tensor's seed) and the same bytes as `sparsify`, several
    times faster; with `probs` (bf16, delta's shape: DELLA's keep probabilities) each entry
    is kept with its own. An L1 rescale (`rescale_rule`) takes torch's norms of the vector
    before and after the drop, as `rescaled` does. False, changing nothing, where the kernel
    does not apply (another dtype, the scale-then-mask order, no kernel, an inf or NaN)."""
    if delta.dtype != torch.bfloat16 or not delta.is_contiguous():
        return False
    if probs is not None and (probs.dtype != torch.bfloat16 or not probs.is_contiguous()):
        return False
    if rule == "l1_ratio" and release.rescale != "mask_then_scale":
        return False
    fn = dare_kernel()
    if fn is None:
        return False
    p = float(dare_probabilities(delta.reshape(-1)[:1], density))  # the density as bf16 rounds it
    before = delta.abs().sum() if rule == "l1_ratio" else None
    ptr = None if probs is None else probs.data_ptr()
    if fn(delta.data_ptr(), delta.numel(), seed, p, ptr, int(rule == "inverse_density"), density) != 0:
        return False
    if before is not None:
        after = delta.abs().sum()
        if _ratio_applies(before, after, release):
            delta.mul_(before / after)
    return True


# --- in place (the streamed form) -----------------------------------------------------------


def sparsify_(kind: str | None, delta: "torch.Tensor", params: Mapping[str, Any], rescale: bool,
              release: "Release", seed: int, pool: "Executor | None" = None) -> None:
    """`sparsify` in place on a contiguous task vector, without building a mask.

    Dropped entries become +0 where `delta * mask` gives -0 for negative entries; every use
    of a task vector ends in a sum over models, which starts from +0, so the sign of a zero
    never reaches the result.
    """
    if not sparsifies(kind, params):
        return
    rule = rescale_rule(kind, rescale, release)
    if kind == "random" and dare_(delta, params["density"], rule, seed, release):
        return
    if kind == "della_magprune" and delta.dtype == torch.bfloat16 and rule != "inverse_density":
        probs = della_probabilities(della_rows(delta), params["density"], params["epsilon"], pool)
        if dare_(delta, params["density"], rule, seed, release, probs.reshape(delta.shape)):
            return
    if kind in ("random", "della_magprune"):
        delta.copy_(sparsify(kind, delta, params, rescale, release, seed))
        return
    band = band_of(kind, delta.numel(), params, release)
    before = delta.abs().sum() if rescale else None
    if not native.zero_outside(delta, *band):  # the same entries, ranked by torch's sort
        delta.view(-1)[dropped_positions(delta, band)] = 0
    if rescale:
        after = delta.abs().sum()
        if _ratio_applies(before, after, release):
            delta.mul_(before / after)
