"""Element-by-element audit of random merges: is each published value one the recipe allows?

For dare_ties, dare_linear, della, della_linear (and arcee_fusion on tensors over 10^6
elements) mergekit draws from one global generator whose seed is rarely published, so a re-run
cannot give the published bytes. What the recipe does fix, and what is checked here, one
tensor at a time (`check_tensor`), then over the whole model (`summarize`):

1. **Every value.** After the masks, everything is elementwise. With `n` models whose masks
   are drawn (density < 1; a model with density 1 is always kept), an element's published
   value must be one of 2^n candidates: one per subset S of them kept there. The candidate of
   S is the family's own combination (`task_arithmetic.combine`: weights, sign election,
   normalize, lambda, every rounding) of task vectors whose entries are "kept" (rescaled by
   `sparsify.kept_entries` in the work dtype of `sparsify.work_dtype`, then cast back) for the
   models of S and "dropped" (`kept_entries` of `delta * 0`: a signed zero, as mergekit's
   `delta * mask`) for the others. So for each S one candidate tensor is built from uniform
   masks and compared with the published tensor bit for bit. `n <= MAX_MODELS` (16
   candidates); more is refused.

2. **The rescale factor.** With the L1 rescale (`release.dare_rescale == "l1_ratio"`, and
   DELLA's), model i's kept entries are multiplied by one scalar per tensor,
   r_i = |d_i|_1 / |d_i * m_i|_1, a 0-d tensor of the work dtype (for bf16 a bf16 value near
   1 / density) that depends on the unknown mask. It is found from the data, in stages:
   - a box per model (`_boxes`): at elements where only model i (of the drawn models) has a
     nonzero task-vector entry and the value changed, the candidate "i kept" must equal the
     published value; the work-dtype values of r doing so form an interval per element
     (every rounding is monotone in r), found by bisection on r's bit patterns with the
     project's arithmetic. The values covered by the most intervals (all of them, for a
     genuine merge: these elements all cover the true r) are the box. A model without such
     elements votes on every changed element with its entry nonzero, under every subset
     keeping it, the other factors fixed (with sign election only where all nonzero entries
     share a sign, so that the candidate stays monotone in r);
   - the joint search (`_search`): within the boxes, a candidate changes only where some
     model's kept value (one rounding of d * r) steps (`_levels`), so the boxes split into
     cells of constant candidates. On a sample of `SAMPLE // 4` elements every combination of
     the models' cells is scored (how many elements match some candidate, batched as K * M
     elements with one factor per element) and the best is taken (the middle of its cells;
     one model at a time when the combinations are too many);
   - repairs, only where the estimate does not explain every value: the joint search again
     on the unmatched elements (`_rescan`); each factor moved to the exact ratio of the mask
     the values reveal (`sparsify.l1_ratio` on that mask), or into its L1 range, when that
     loses no match (`_prefer_l1`); then (`_sweep`) the other equally good combinations of
     cells, and the enumeration of masks (`_complete`): where few statuses are unknown
     (`MAX_UNKNOWN` in all; every status on tiny tensors such as the 8-element norms), every
     completion of the masks, its factors computed from it as mergekit does, merged and
     compared: an exact answer where the values alone cannot pin the factors.
   - **the L1 check**: given the statuses the values reveal, |d_i * m_i|_1 lies between the
     sum over the entries known kept and that plus the entries of unknown status, so r_i must
     be `before / after` for such an `after`, in mergekit's roundings (float32 sums rounded to
     the work dtype, the quotient in the work dtype; `_l1_allowed`). A factor outside means
     the published values scale the task vector by something else than the recipe's weight
     and lambda: where one model contributes alone, `w * r` is all the values show, so a
     wrong weight is caught here (or by the elements where models mix).
   Without rescale, or with `inverse_density` (kept / density) there is nothing to estimate.
   The search is heuristic where the values leave the factors loose; a genuine merge it
   fails to explain would be reported as inconsistent (measured: none in 64 remerge merges
   of the four seeded parity recipes with seeds 1..16, and mergekit's own four; see the
   tests).

3. **The kept share.** Model i's kept / dropped status is counted only at elements where it
   can be read AND where its readability does not depend on the status itself: elements
   where the candidates of the subsets containing i and those of the subsets without i share
   no value ("separable"). That criterion depends on the inputs and the factors only, never on
   a mask, so the count is a fair sample of model i's draws (the factors depend on the masks
   through one scalar each; its effect on separability is negligible). It leaves out, by
   construction: entries where d_i == 0 (the two sets coincide); sign conflicts that model i
   loses under TIES sign election (with the winner kept, i's entry is masked out whether i
   kept it or not: f(S + i) = f(S), the sets meet); and rounding coincidences, e.g. where
   "only i kept" rounds to the value of "only j kept": there "i kept" would hide while
   "i dropped" shows, the status-dependent visibility that biases a count of whatever the
   values happen to reveal. A conflict model i wins stays in (its status shows either way);
   elements whose nonzero entries share one sign are in unless a rounding coincidence puts
   them out. Elements matching no candidate are left out (they are reported as unmatched).
   Under the recipe the count is Poisson-binomial: DARE keeps each entry with probability
   `density` as the work dtype holds it (0.7 is 0.69921875 in bf16), DELLA with its
   rank-dependent `della_probabilities` (density +- epsilon by magnitude rank in the row). The
   two-sided p-value doubles the smaller tail, of the exact distribution (binomial closed
   form; DELLA: dynamic programming up to `EXACT_UP_TO` entries) or of the normal
   approximation with continuity correction beyond. `summarize` also pools each model's
   counts over the tensors (independent draws: the sums of means and variances).
   **The margin.** Each keep probability is trusted only to +- `DENSITY_MARGIN` (one point):
   the p-value is taken against the nearest of probs - margin and probs + margin (1 between
   them). The reason is torch's own sampler: on the CPU, `torch.bernoulli` with a bf16 result
   (DARE and DELLA on bf16 draw in bf16, in mergekit as here) is not binomial in torch 2.13:
   measured over generator seeds, 2^20 draws at p = 0.5 keep exactly 2^19 for each of 20
   seeds, 10^7 draws keep 50.10% on average with only two distinct outcomes in 20 seeds, and
   2 * 10^7 draws at 0.875 keep 87.8% (0.3 points, 40 sd, high); float32 draws are binomial,
   and on small tensors (the parity models') the bf16 draws equal the float32 ones. A
   genuine bf16 merge of real size would fail a pure binomial test; a wrong density (0.5 for
   0.7) is far beyond one point.

4. **The verdict.** `summarize` says `INCONSISTENT` when any element matches no candidate,
   any factor fails the L1 check, or any p-value (per tensor and model, and pooled per model)
   is below `alpha / m` (Bonferroni over the m tests), alpha = `ALPHA` = 1e-6 by default;
   the band a message states is the expected share +- (margin + z sd), z the threshold's.
   Why so small: calling a genuine merge inconsistent is an accusation, so the family-wise
   false-alarm rate is kept at one in a million; on real tensors (10^6+ entries) this costs
   nothing (a density off by 0.02 is then > 10 sd beyond the margin). The price is paid on
   tiny tensors:
   with 60 tests the per-test threshold is 1.7e-8 (5.6 sd), and a tensor with fewer than
   about 26 testable entries can never reach it at density 0.5 (0 of 25 kept has p = 6e-8):
   the parity models' norms (8 elements) and k/v projections (32) cannot show a wrong
   density; the 400-element embeddings and the pooled test can (tests/test_audit_elementwise).

arcee_fusion keeps base + delta where importance >= median + 1.5 IQR. On at most
`arcee_fusion.SAMPLE` elements the quantiles are exact and the result deterministic:
`check_tensor` then simply computes it (the method's own function) and counts differing
elements (the same as the audit's byte comparison; `needs_check` says which tensors need the
element-by-element check at all). On larger tensors the quantiles come from 10^6 sampled
entries: each element must be base or base + delta (in float32, then the output dtype), the
kept set an upper set of the importances (every kept importance above every dropped one), and
the cut between them must meet the range the sampled threshold can take (each quantile's
population rank within +- `ARCEE_Z` binomial sd).

Shapes: every tensor is flattened: (N,) per model or (n, N) stacked; M is a chunk or sample,
K a number of trial factors (batched as K * M elements).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from remerge.errors import AuditError
from remerge.io.safetensors import torch_dtype
from remerge.merge.methods import arcee_fusion as fusion
from remerge.merge.methods.sparsify import (
    dare_probabilities, della_probabilities, della_rows, kept_entries, l1_ratio, rescale_rule,
    sparsifies, work_dtype,
)
from remerge.merge.methods.task_arithmetic import STEPS, Steps, check_della, combine

if TYPE_CHECKING:
    import torch

    from remerge.merge.tensor import TensorInputs, TensorTask

CONSISTENT = "consistent with the recipe (random method, checked element by element)"
INCONSISTENT = "inconsistent"

RANDOM_GTA = ("dare_ties", "dare_linear", "della", "della_linear")
MAX_MODELS = 4  # 2^4 = 16 candidates per element
CHUNK = 1 << 20  # elements (or trial x element pairs) per batch
SAMPLE = 1 << 14  # elements a box is estimated on (a quarter of it for the joint search)
MAX_LEVELS = 512  # cells per model in the joint search (else: evenly spaced trials)
MAX_WORK = 1 << 23  # trial x element pairs per search
MAX_TRIES = 64  # factor values tried per model when moving a factor into its L1 range
MAX_SWEEP = 16  # equally good combinations of factors tried when the first does not explain all
MAX_UNKNOWN = 16  # statuses enumerated jointly (2^16 combinations of masks) by `_complete`
MAX_ENUMERATION = 1 << 26  # combinations of masks x elements `_complete` merges at most
MAX_RATIO = 2.0**30  # the largest rescale factor searched (1 / the smallest kept share)
EXACT_UP_TO = 4096  # DELLA: exact distribution of the kept count up to this many entries
ALPHA = 1e-6  # family-wise false-alarm rate of `summarize` (Bonferroni)
BAND_Z = 5.0  # the band `check_tensor` reports: expected share +- (margin + 5 sd) (display only)
DENSITY_MARGIN = 0.01  # keep probabilities are trusted to +- 1 point (torch's bf16 draws: below)
ARCEE_Z = 6.0  # sampled quantile ranks: +- 6 binomial sd
SUM_ERROR = 1e-5  # relative error bound of a float32 sum of non-negative terms (cascade summation)


def supports(method_name: str) -> bool:
    """Whether `check_tensor` can audit tensors of this method."""
    return method_name in RANDOM_GTA or method_name == "arcee_fusion"


def needs_check(task: "TensorTask") -> bool:
    """Whether this tensor's bytes depend on mergekit's unknown draws (else compare bytes):
    a DARE / DELLA tensor where some model drops entries, an arcee_fusion tensor whose
    quantiles are sampled."""
    if task.method.name == "arcee_fusion":
        return math.prod(task.shape) > fusion.SAMPLE
    if task.method.name not in RANDOM_GTA:
        return False
    kind = STEPS[task.method.name].sparsification
    return any(sparsifies(kind, p) for p in task.params)


# --- bits and dtypes -------------------------------------------------------------------------


def _int_dtype(dtype: "torch.dtype") -> "torch.dtype":
    import torch

    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]


def _bits(t: "torch.Tensor") -> "torch.Tensor":
    """The flat bit patterns of a float tensor (compared for exact equality)."""
    return t.contiguous().reshape(-1).view(_int_dtype(t.dtype))


def _from_bits(bits: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    """Floats of `dtype` from non-negative bit patterns (int64 holding them): positive floats
    are ordered as their bit patterns, so factors are searched on these integers."""
    return bits.to(_int_dtype(dtype)).view(dtype)


def _bits_of(value: float, dtype: "torch.dtype") -> int:
    import torch

    return int(_bits(torch.tensor([value], dtype=dtype))[0])


def _value_of(bits: int, dtype: "torch.dtype") -> float:
    import torch

    return float(_from_bits(torch.tensor([bits]), dtype)[0])


def _scalar(bits: int, dtype: "torch.dtype") -> "torch.Tensor":
    """A factor as mergekit holds it: a 0-d tensor of the work dtype."""
    import torch

    return torch.tensor(_value_of(bits, dtype), dtype=dtype)


def _bits_of_scalar(t: "torch.Tensor") -> int:
    return int(_bits(t.reshape(1))[0])


# --- one tensor's inputs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One tensor's fixed inputs, flat (or a restriction of them to some elements)."""

    task: "TensorTask"
    steps: Steps
    base: "torch.Tensor"  # (N,) compute dtype
    work: "torch.Tensor"  # (n, N) task vectors x_i - base, in the work dtype
    published: "torch.Tensor"  # (N,) bit patterns of the published tensor
    free: tuple[int, ...]  # the models whose masks are drawn (density < 1), recipe order
    rules: tuple[str | None, ...]  # per model: `sparsify.rescale_rule`

    @property
    def compute(self) -> "torch.dtype":
        return self.base.dtype

    @property
    def work_dtype(self) -> "torch.dtype":
        return self.work.dtype

    @property
    def out(self) -> "torch.dtype":
        return torch_dtype(self.task.dtype)

    @property
    def n(self) -> int:
        return self.work.shape[0]

    @property
    def size(self) -> int:
        return self.base.numel()

    def members(self, subset: int) -> tuple[bool, ...]:
        """Which models a subset (bit j: the j-th free model) keeps; fixed ones always."""
        keep = [True] * self.n
        for j, i in enumerate(self.free):
            keep[i] = bool(subset >> j & 1)
        return tuple(keep)

    def subsets(self) -> range:
        return range(1 << len(self.free))

    def with_model(self, i: int) -> list[int]:
        """The subsets keeping free model i."""
        j = self.free.index(i)
        return [s for s in self.subsets() if s >> j & 1]


def _frame(task: "TensorTask", inputs: "TensorInputs", published: "torch.Tensor") -> Frame:
    import torch

    steps = STEPS[task.method.name]
    check_della(steps, task)  # density +- epsilon outside (0, 1): refused, as by a merge
    base = inputs.base().reshape(-1)
    # x - base in the compute dtype (as `task_arithmetic.merge`), then the work dtype
    deltas = [torch.sub(inputs.model(i).reshape(-1), base) for i in range(len(task.models))]
    work = (torch.stack(deltas) if deltas else base.new_empty((0, base.numel()))).to(work_dtype(base.dtype))
    kind, rescale = steps.sparsification, task.shared["rescale"]
    free = tuple(i for i, p in enumerate(task.params) if sparsifies(kind, p))
    rules = tuple(rescale_rule(kind, rescale, task.release) for _ in task.params)
    return Frame(task, steps, base, work, _bits(published), free, rules)


def _restrict(frame: Frame, where: "torch.Tensor") -> Frame:
    """The same tensor at the elements `where` (M,) only (everything is elementwise)."""
    return replace(frame, base=frame.base[where], work=frame.work[:, where], published=frame.published[where])


def _scalable(frame: Frame, i: int) -> bool:
    """Whether model i's kept entries carry an unknown L1 factor."""
    if i not in frame.free or frame.rules[i] != "l1_ratio":
        return False
    before = frame.work[i].abs().sum()  # as mergekit's `l1_ratio` computes it
    return not bool(before < frame.task.release.rescale_min_norm)  # else never rescaled


# --- candidates ------------------------------------------------------------------------------


def _entries(frame: Frame, i: int, w: "torch.Tensor",
             ratio: "torch.Tensor | None") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Model i's task-vector entries `w` (work dtype, (M,)) where kept and where dropped, in
    the compute dtype; `ratio`: its L1 factor (0-d or (M,), work dtype) or None."""
    if i not in frame.free:  # density 1: `sparsify` returns the task vector itself
        d = w.to(frame.compute)
        return d, d
    density = frame.task.params[i]["density"]
    rule = frame.rules[i]
    kept = kept_entries(w, rule, density, ratio).to(frame.compute)
    dropped = kept_entries(w * 0, rule, density, ratio).to(frame.compute)
    return kept, dropped


def _all_values(frame: Frame, ratios: Sequence["torch.Tensor | None"]) -> list:
    return [_entries(frame, i, frame.work[i], ratios[i]) for i in range(frame.n)]


def _candidate(frame: Frame, values: Sequence[tuple["torch.Tensor", "torch.Tensor"]],
               keep: Sequence[bool], base: "torch.Tensor") -> "torch.Tensor":
    """The output (output dtype, (M,)) when the models in `keep` kept their entries."""
    import torch

    if not values:  # no merged model has this tensor: the base
        return base.to(frame.out)
    deltas = torch.stack([v[0] if k else v[1] for v, k in zip(values, keep)])  # (n, M)
    weights = [p["weight"] for p in frame.task.params]
    return combine(frame.steps, base, deltas, weights, frame.task.shared).to(frame.out)


def _matched(frame: Frame, ratios: Sequence) -> "torch.Tensor":
    """(N,) bool: where the published value equals some candidate."""
    import torch

    values = _all_values(frame, ratios)
    hit = torch.zeros(frame.size, dtype=torch.bool)
    for s in frame.subsets():
        hit |= _bits(_candidate(frame, values, frame.members(s), frame.base)) == frame.published
    return hit


def _scores(frame: Frame, ratios: Sequence, trials: Mapping[int, "torch.Tensor"]) -> "torch.Tensor":
    """(K,): for each of K trials, how many elements of `frame` match some candidate, with
    the factors of the models in `trials` ((K,) bits each) and the others at `ratios`.
    Batched: K * N elements with one factor per element."""
    import torch

    k = len(next(iter(trials.values())))
    size = frame.size
    step = max(1, CHUNK // max(1, size))
    fixed = {i: _entries(frame, i, frame.work[i], ratios[i]) for i in range(frame.n) if i not in trials}
    out = []
    for start in range(0, k, step):
        count = min(k, start + step) - start
        base, target = frame.base.repeat(count), frame.published.repeat(count)
        values = []
        for i in range(frame.n):
            if i in trials:
                ratio = _from_bits(trials[i][start:start + count].repeat_interleave(size), frame.work_dtype)
                values.append(_entries(frame, i, frame.work[i].repeat(count), ratio))
            else:
                values.append(tuple(v.repeat(count) for v in fixed[i]))
        hit = torch.zeros(count * size, dtype=torch.bool)
        for s in frame.subsets():
            hit |= _bits(_candidate(frame, values, frame.members(s), base)) == target
        out.append(hit.reshape(count, size).sum(1))
    return torch.cat(out)


# --- the rescale factor: boxes -----------------------------------------------------------------


def _first_true(pred, lo: "torch.Tensor", hi: "torch.Tensor") -> "torch.Tensor":
    """Per element, the smallest b in [lo, hi] with pred(b) true (pred false then true as b
    grows); hi + 1 where none. lo, hi: (M,) int64."""
    import torch

    low, high = lo.clone(), hi + 1
    while bool((low < high).any()):
        open_ = low < high
        mid = torch.where(open_, (low + high) // 2, low)
        hit = pred(mid)
        high = torch.where(open_ & hit, mid, high)
        low = torch.where(open_ & ~hit, mid + 1, low)
    return low


def _domain(frame: Frame) -> tuple[int, int]:
    """The factor bits searched: [1, MAX_RATIO] (a factor is never below 1: after <= before)."""
    return _bits_of(1.0, frame.work_dtype), _bits_of(MAX_RATIO, frame.work_dtype)


def _intervals(frame: Frame, i: int, subset: int, ratios: Sequence) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per element of `frame`, the factor bits [first, last] of model i for which the
    candidate of `subset` (which keeps i) equals the published value (first > last: none),
    by bisection: the candidate is monotone in the factor (with sign election, only where
    the entries of the kept models share a sign)."""
    import torch

    lo, hi = _domain(frame)
    keep = frame.members(subset)
    target = _from_bits(frame.published, frame.out).double()
    values = _all_values(frame, ratios)

    def output(bits: "torch.Tensor") -> "torch.Tensor":
        trial = list(values)
        trial[i] = _entries(frame, i, frame.work[i], _from_bits(bits, frame.work_dtype))
        return _candidate(frame, trial, keep, frame.base).double()

    low = torch.full((frame.size,), lo, dtype=torch.int64)
    high = torch.full((frame.size,), hi, dtype=torch.int64)
    direction = torch.sign(output(high) - output(low))  # +1: the output grows with the factor
    direction[torch.isnan(direction)] = 0
    first = _first_true(lambda b: direction * (output(b) - target) >= 0, low, high)
    last = _first_true(lambda b: direction * (output(b) - target) > 0, low, high) - 1
    stuck = (direction == 0) | ~torch.isfinite(target)
    return torch.where(stuck, hi + 1, first), torch.where(stuck, lo, last)


def _regions(first: "torch.Tensor", last: "torch.Tensor", prefer: int) -> list[tuple[int, int, int]]:
    """The maximal runs of bits of equal coverage by the intervals [first, last], as
    (lo, hi, count), the most covered first (equally covered: nearest `prefer` first)."""
    import torch

    ok = first <= last
    if not bool(ok.any()):
        return []
    count = int(ok.sum())
    positions = torch.cat([first[ok], last[ok] + 1])
    steps = torch.cat([torch.ones(count, dtype=torch.int64), -torch.ones(count, dtype=torch.int64)])
    where, inverse = torch.unique(positions, return_inverse=True)  # sorted
    cover = torch.zeros(where.numel(), dtype=torch.int64).scatter_add_(0, inverse, steps).cumsum(0)
    runs = [(int(where[k]), int(where[k + 1]) - 1, int(cover[k]))  # coverage on [where[k], where[k + 1])
            for k in range(where.numel() - 1) if cover[k] > 0]
    def distance(run: tuple[int, int, int]) -> int:
        return 0 if run[0] <= prefer <= run[1] else min(abs(run[0] - prefer), abs(run[1] - prefer))

    return sorted(runs, key=lambda run: (-run[2], distance(run)))


def _best_region(first: "torch.Tensor", last: "torch.Tensor", prefer: int) -> tuple[int, int, int]:
    """The bits covered by the most intervals [first, last]: (lo, hi, count); of several
    equally covered regions, the one nearest `prefer`. (0, -1, 0) when none is non-empty."""
    runs = _regions(first, last, prefer)
    return runs[0] if runs else (0, -1, 0)


def _spread(mask: "torch.Tensor", limit: int) -> "torch.Tensor":
    """At most `limit` positions where `mask` holds, evenly spread (deterministic)."""
    import torch

    where = torch.nonzero(mask).flatten()
    if where.numel() > limit:
        where = where[torch.linspace(0, where.numel() - 1, limit).long()]
    return where


def _nominal(frame: Frame, i: int) -> int:
    return _bits_of(min(1 / frame.task.params[i]["density"], MAX_RATIO), frame.work_dtype)


def _changed(frame: Frame, ratios: Sequence) -> "torch.Tensor":
    """(N,) bool: the published value differs from the candidate keeping no drawn model."""
    empty = _candidate(frame, _all_values(frame, ratios), frame.members(0), frame.base)
    return _bits(empty) != frame.published


def _boxes(frame: Frame, ratios: list, changed: "torch.Tensor") -> tuple[dict, dict]:
    """Each scaled model's factor bits consistent with the values (a vote, `_best_region`):
    at the elements where it alone (of the drawn models) has a nonzero entry and the value
    changed, under "only it kept" (every such element covers the true factor); for a model
    without such elements, at every changed element with a nonzero entry of it, under every
    subset keeping it, the other factors at their current values (two rounds when several
    models are in this case; with sign election only where the nonzero entries share a
    sign). Returns ({model: (lo, hi)}, {model: record}); `ratios` is set to the boxes' middles."""
    import torch

    nonzero = frame.work != 0
    boxes, records, weak = {}, {}, []
    for i in (i for i in range(frame.n) if ratios[i] is not None):
        others = [j for j in frame.free if j != i]
        alone = nonzero[i] & changed & ~(nonzero[others].any(0) if others else torch.zeros_like(changed))
        where = _spread(alone, SAMPLE)
        if not where.numel():
            weak.append(i)
            continue
        first, last = _intervals(_restrict(frame, where), i, 1 << frame.free.index(i), ratios)
        lo, hi, votes = _best_region(first, last, _nominal(frame, i))
        boxes[i] = (lo, hi) if votes else _domain(frame)
        records[i] = {"votes": votes, "voters": int(where.numel()), "alone": True}
        ratios[i] = _scalar(sum(boxes[i]) // 2, frame.work_dtype)
    signs = torch.sign(frame.work)
    one_sign = ~((signs > 0).any(0) & (signs < 0).any(0))
    if not frame.steps.consensus:  # no sign election: every candidate is monotone
        one_sign = torch.ones_like(changed)
    for _ in range(2 if len(weak) > 1 else 1):
        for i in weak:
            alone = 1 << frame.free.index(i)  # "only i kept": monotone everywhere
            where = _spread(nonzero[i] & changed, SAMPLE)
            spans = [_intervals(_restrict(frame, where), i, alone, ratios)]
            mixed = _restrict(frame, _spread(nonzero[i] & changed & one_sign, SAMPLE))
            spans += [_intervals(mixed, i, s, ratios) for s in frame.with_model(i) if s != alone]
            firsts, lasts = torch.cat([a for a, _ in spans]), torch.cat([b for _, b in spans])
            runs = _regions(firsts, lasts, _nominal(frame, i))
            boxes[i] = runs[0][:2] if runs else _domain(frame)
            records[i] = {"votes": runs[0][2] if runs else 0, "voters": int(where.numel()), "alone": False,
                          "other_boxes": [list(r[:2]) for r in runs[1:1 + MAX_SWEEP]]}
            ratios[i] = _scalar(sum(boxes[i]) // 2, frame.work_dtype)
    return boxes, records


# --- the rescale factor: the joint search ---------------------------------------------------------


def _levels(frame: Frame, i: int, lo: int, hi: int) -> list[int] | None:
    """The starts of the cells of [lo, hi] on which model i's kept value is constant at every
    element of `frame` (so every candidate is): lo and each factor at which some kept value
    (one rounding of d * r, whose magnitude grows with r) steps to the next value of the
    compute dtype, all found in one bisection over (element, step) pairs. Every factor when
    [lo, hi] is narrow; None when there are more than MAX_LEVELS."""
    import torch

    if hi - lo < MAX_LEVELS:
        return list(range(lo, hi + 1))
    w = frame.work[i][frame.work[i] != 0]
    if not w.numel():
        return [lo]
    magnitude = (1 << (8 * torch.empty((), dtype=frame.compute).element_size() - 1)) - 1

    def size(bits: "torch.Tensor", at: "torch.Tensor") -> "torch.Tensor":  # |kept| as ordered bits
        kept = _entries(frame, i, w[at], _from_bits(bits, frame.work_dtype))[0]
        return _bits(kept).to(torch.int64) & magnitude

    every = torch.arange(w.numel())
    low = size(torch.full((w.numel(),), lo, dtype=torch.int64), every)
    steps = size(torch.full((w.numel(),), hi, dtype=torch.int64), every) - low  # (M,)
    if int(steps.sum()) > 4 * MAX_LEVELS:
        return None
    at = torch.repeat_interleave(every, steps)  # one pair per step
    ranks = [torch.arange(1, int(k) + 1) for k in steps[steps > 0]]  # 1..steps per element
    goal = low[at] + (torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64))
    pairs = at.numel()
    found = _first_true(lambda b: size(b, at) >= goal, torch.full((pairs,), lo, dtype=torch.int64),
                        torch.full((pairs,), hi, dtype=torch.int64))
    starts = sorted({lo, *found[found <= hi].tolist()})
    return starts if len(starts) <= MAX_LEVELS else None


def _cell(levels: Sequence[int], k: int, hi: int) -> tuple[int, int]:
    return levels[k], (levels[k + 1] - 1 if k + 1 < len(levels) else hi)


def _search(frame: Frame, ratios: Sequence, boxes: Mapping[int, tuple[int, int]]) -> tuple[list, dict, list]:
    """The factors (within `boxes`, bits) that make the most elements of `frame` match: every
    combination of the models' cells when there are few enough, else one model at a time
    (3 rounds). Returns (ratios, {model: the chosen cell (lo, hi)}, the other equally good
    combinations of cells, at most MAX_SWEEP, evenly spread)."""
    import torch

    ratios = list(ratios)
    models = list(boxes)
    levels = {i: _levels(frame, i, *boxes[i]) for i in models}
    size = max(1, frame.size)
    cells = {}
    joint = all(v is not None for v in levels.values())
    if joint and math.prod(len(v) for v in levels.values()) * size <= MAX_WORK:
        index = torch.cartesian_prod(*[torch.arange(len(levels[i])) for i in models]).reshape(-1, len(models))
        trials = {i: torch.tensor(levels[i])[index[:, j]] for j, i in enumerate(models)}
        scores = _scores(frame, ratios, trials)
        ties = _spread(scores == scores.max(), MAX_SWEEP).tolist()  # the first of the best first
        combos = [{i: _cell(levels[i], int(index[k, j]), boxes[i][1]) for j, i in enumerate(models)}
                  for k in ties]
        cells = combos[0]
        for i in models:
            ratios[i] = _scalar(sum(cells[i]) // 2, frame.work_dtype)
        return ratios, cells, combos[1:]
    for _ in range(3 if len(models) > 1 else 1):
        for i in models:
            lo, hi = boxes[i]
            axis = levels[i]
            if axis is None or len(axis) * size > MAX_WORK:  # evenly spaced trials
                count = max(2, min(MAX_LEVELS, MAX_WORK // size))
                axis = sorted(set(torch.linspace(lo, hi, count).round().long().tolist()))
            k = int(torch.argmax(_scores(frame, ratios, {i: torch.tensor(axis)})))
            cells[i] = _cell(axis, k, hi)
            ratios[i] = _scalar(sum(cells[i]) // 2, frame.work_dtype)
    return ratios, cells, []


def _estimate(frame: Frame) -> tuple[list, list, list]:
    """Each model's L1 factor (a 0-d work-dtype tensor, or None where there is none to find),
    its search record (the box `box_bits`, its votes, the chosen cell `region_bits`) and the
    equally good alternatives (`_search`)."""
    ratios: list = [None] * frame.n
    records: list[dict[str, Any]] = [{} for _ in range(frame.n)]
    scaled = [i for i in range(frame.n) if _scalable(frame, i)]
    if not scaled:
        return ratios, records, []
    for i in scaled:
        ratios[i] = _scalar(_nominal(frame, i), frame.work_dtype)
    changed = _changed(frame, ratios)
    boxes, found = _boxes(frame, ratios, changed)
    mixed = _spread(changed & (frame.work[scaled] != 0).any(0), SAMPLE // 4)
    ratios, cells, others = _search(_restrict(frame, mixed), ratios, boxes)
    for i in scaled:
        records[i] = {**found[i], "box_bits": list(boxes[i]), "region_bits": list(cells.get(i, boxes[i]))}
    return ratios, records, others


# --- evaluating every candidate ------------------------------------------------------------


@dataclass
class Tally:
    """What the values show, per model: statuses at the separable elements, L1 bounds."""

    matched: "torch.Tensor"  # (N,) bool: equal to some candidate
    tested: "torch.Tensor"  # (n, N) bool: separable and matched
    kept: "torch.Tensor"  # (n, N) bool: tested and kept
    shown_kept: "torch.Tensor"  # (n, N) bool: every matching candidate keeps model i
    shown_dropped: "torch.Tensor"  # (n, N) bool: every matching candidate drops it
    after_low: list[float]  # sum of |d_i| over the entries known kept
    after_unknown: list[float]  # sum of |d_i| over the entries of unknown status


def _tally(frame: Frame, ratios: Sequence) -> Tally:
    """Compare the published tensor with every candidate, a chunk of elements at a time."""
    import torch

    total = frame.base.numel()
    subsets = range(1 << len(frame.free))
    matched = torch.zeros(total, dtype=torch.bool)
    tested = torch.zeros((frame.n, total), dtype=torch.bool)
    kept = torch.zeros((frame.n, total), dtype=torch.bool)
    shown_kept = torch.zeros((frame.n, total), dtype=torch.bool)
    shown_dropped = torch.zeros((frame.n, total), dtype=torch.bool)
    low, unknown = [0.0] * frame.n, [0.0] * frame.n
    for start in range(0, total, CHUNK):
        part = slice(start, min(total, start + CHUNK))
        values = [_entries(frame, i, frame.work[i, part], ratios[i]) for i in range(frame.n)]
        cands = torch.stack([_bits(_candidate(frame, values, frame.members(s), frame.base[part]))
                             for s in subsets])  # (2^k, M)
        hits = cands == frame.published[part]  # (2^k, M)
        matched[part] = hits.any(0)
        for i in frame.free:
            inside = frame.with_model(i)
            outside = [s for s in subsets if s not in inside]
            shown_in, shown_out = hits[inside].any(0), hits[outside].any(0)
            # separable: no candidate keeping i equals one dropping it (a mask-free test)
            clash = (cands[inside].unsqueeze(1) == cands[outside].unsqueeze(0)).flatten(0, 1).any(0)
            tested[i, part] = ~clash & matched[part]
            kept[i, part] = tested[i, part] & shown_in
            shown_kept[i, part] = shown_in & ~shown_out
            shown_dropped[i, part] = shown_out & ~shown_in
            size = frame.work[i, part].double().abs()
            low[i] += float(size[shown_in & ~shown_out].sum())
            unknown[i] += float(size[shown_in == shown_out].sum())
    return Tally(matched, tested, kept, shown_kept, shown_dropped, low, unknown)


# --- repairs -------------------------------------------------------------------------------


def _evaluation_set(frame: Frame, tally: Tally) -> Frame:
    """The elements factors are tried on: unmatched ones and a sample of the matched ones."""
    import torch

    where = torch.cat([_spread(~tally.matched, SAMPLE // 8), _spread(tally.matched, SAMPLE // 8)])
    return _restrict(frame, where)


def _rescan(frame: Frame, ratios: Sequence, records: Sequence[dict], tally: Tally) -> tuple[list, list]:
    """Where elements match no candidate: the joint search again, within the boxes, on the
    unmatched elements and a sample of the matched ones: (ratios, alternatives)."""
    boxes = {i: tuple(r["box_bits"]) for i, r in enumerate(records) if r.get("box_bits")}
    ratios, cells, others = _search(_evaluation_set(frame, tally), ratios, boxes)
    for i, cell in cells.items():
        records[i].update(region_bits=list(cell), rescanned=True)
    return ratios, others


def _exact_ratio(frame: Frame, i: int, tally: Tally) -> int | None:
    """Model i's L1 factor (bits) as mergekit computes it, from the mask the values reveal,
    when they reveal every nonzero entry's status."""
    if tally.after_unknown[i] > 0:
        return None
    return _exact_bits(frame, i, tally.shown_kept[i])


def _exact_bits(frame: Frame, i: int, mask: "torch.Tensor") -> int:
    """The bits of model i's L1 factor for a mask ((N,) bool), as mergekit computes it
    (`sparsify.l1_ratio` on the tensor's shape); a skipped rescale is the factor 1."""
    shape = frame.task.shape
    work = frame.work[i].reshape(shape)
    ratio = l1_ratio(work, work * mask.reshape(shape).to(work.dtype), frame.task.release)
    return _bits_of(1.0, work.dtype) if ratio is None else _bits_of_scalar(ratio)


def _inside(limits: tuple[float, float], dtype: "torch.dtype") -> tuple[int, int]:
    """The bits of the factors of `dtype` within `limits` (and the searched domain)."""
    lo = _bits_of(max(limits[0], 1.0), dtype)
    lo += _value_of(lo, dtype) < limits[0]
    hi = _bits_of(min(limits[1], MAX_RATIO), dtype)
    hi -= _value_of(hi, dtype) > limits[1]
    return lo, hi


def _with(ratios: Sequence, i: int, bits: int, dtype: "torch.dtype") -> list:
    out = list(ratios)
    out[i] = _scalar(bits, dtype)
    return out


def _prefer_l1(frame: Frame, ratios: Sequence, records: Sequence[dict], tally: Tally):
    """Move the factors to what the L1 norms of the revealed masks allow, when that loses no
    matching element: each to the exact ratio of its revealed mask (where the values reveal
    all of it), else into its allowed range; then each to the allowed value that makes the
    most sampled elements match with the others moved. The statuses, and so the ranges,
    follow the factors: repeated until nothing moves (at most 3 times).
    Returns (ratios, tally, allowed ranges)."""
    import torch

    work = frame.work_dtype
    scaled = [i for i in frame.free if records[i].get("region_bits")]
    ratios = list(ratios)
    for _ in range(3):
        allowed = {i: _inside(_l1_allowed(frame, i, tally), work) for i in scaled}
        sub = _evaluation_set(frame, tally)
        trial = list(ratios)
        for i in scaled:  # first guesses, all at once
            lo, hi = allowed[i]
            current = _bits_of_scalar(trial[i])
            exact = _exact_ratio(frame, i, tally)
            guess = exact if exact is not None else (current if lo > hi else min(max(current, lo), hi))
            trial = _with(trial, i, guess, work)
        for i in scaled:  # then the best allowed value of each, the others at their guesses
            lo, hi = allowed[i]
            if lo > hi:
                continue
            current = _bits_of_scalar(trial[i])
            tries = _levels(sub, i, lo, hi) or torch.linspace(lo, hi, MAX_TRIES).round().long().tolist()
            tries = sorted({current, *tries}, key=lambda b: abs(b - current))[:MAX_TRIES]
            best = int(torch.argmax(_scores(sub, trial, {i: torch.tensor(tries)})))
            trial = _with(trial, i, tries[best], work)
        same = all(_bits_of_scalar(a) == _bits_of_scalar(b) for a, b in zip(trial, ratios) if a is not None)
        if same or int(_matched(sub, trial).sum()) < int(_matched(sub, ratios).sum()):
            break
        moved = _tally(frame, trial)
        if int(moved.matched.sum()) < int(tally.matched.sum()):
            break
        ratios, tally = trial, moved
        for i in scaled:
            records[i].update(region_bits=[_bits_of_scalar(ratios[i])] * 2, l1_moved=True)
    return ratios, tally, {i: _l1_allowed(frame, i, tally) for i in scaled}


def _complete(frame: Frame, records: Sequence[dict], tally: Tally) -> list | None:
    """The factors of masks that explain every published value, by enumeration: each model's
    mask runs over every status not yet known (every status, when the models have at most
    MAX_UNKNOWN nonzero entries in all), its factor is computed from the mask as mergekit
    does, and every combination of the models' masks is merged elementwise and compared.
    None when no combination explains all values, or there are too many."""
    import torch

    scaled = [i for i in frame.free if records[i].get("region_bits")]
    if not scaled:
        return None
    nonzero = frame.work != 0
    if sum(int(nonzero[i].sum()) for i in scaled) <= MAX_UNKNOWN:
        unknown = {i: nonzero[i] for i in scaled}
    else:
        unknown = {i: nonzero[i] & ~(tally.shown_kept[i] | tally.shown_dropped[i]) for i in scaled}
    sizes = [int(unknown[i].sum()) for i in scaled]
    if sum(sizes) > MAX_UNKNOWN or (1 << sum(sizes)) * frame.size > MAX_ENUMERATION:
        return None
    options = {}  # model -> ((2^u, N) masks, (2^u,) factor bits)
    for i, u in zip(scaled, sizes):
        codes = (torch.arange(1 << u).unsqueeze(1) >> torch.arange(u)) & 1  # (2^u, u)
        masks = (tally.shown_kept[i] & ~unknown[i]).expand(1 << u, -1).clone()
        masks[:, torch.nonzero(unknown[i]).flatten()] = codes.bool()
        options[i] = masks, torch.tensor([_exact_bits(frame, i, m) for m in masks])
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    total = 1 << sum(sizes)
    step = max(1, CHUNK // frame.size)
    for start in range(0, total, step):
        combos = torch.arange(start, min(total, start + step))  # (K,)
        picks = {i: (combos >> off) & ((1 << u) - 1) for i, off, u in zip(scaled, offsets, sizes)}
        ok = _explains(frame, {i: (options[i][0][picks[i]], options[i][1][picks[i]]) for i in scaled})
        if bool(ok.any()):
            k = int(torch.nonzero(ok)[0])
            ratios: list = [None] * frame.n
            for i in scaled:
                ratios[i] = _scalar(int(options[i][1][picks[i][k]]), frame.work_dtype)
            return ratios
    return None


def _explains(frame: Frame, chosen: Mapping[int, tuple["torch.Tensor", "torch.Tensor"]]) -> "torch.Tensor":
    """(K,) bool: for each of K combinations of the scaled models' masks ((K, N) bool) and
    factors ((K,) bits), whether every element's published value is the merge of those
    statuses (the other drawn models' statuses free per element)."""
    import torch

    k = next(iter(chosen.values()))[0].shape[0]
    size = frame.size
    base, target = frame.base.repeat(k), frame.published.repeat(k)  # (K * N,)
    loose = [i for i in frame.free if i not in chosen]
    values = []
    for i in range(frame.n):
        w = frame.work[i].repeat(k)
        if i in chosen:
            masks, bits = chosen[i]
            kept, dropped = _entries(frame, i, w, _from_bits(bits.repeat_interleave(size), frame.work_dtype))
            values.append((torch.where(masks.reshape(-1), kept, dropped),) * 2)
        else:
            values.append(_entries(frame, i, w, None))
    hit = torch.zeros(k * size, dtype=torch.bool)
    for subset in range(1 << len(loose)):
        keep = [True] * frame.n
        for j, i in enumerate(loose):
            keep[i] = bool(subset >> j & 1)
        hit |= _bits(_candidate(frame, values, keep, base)) == target
    return hit.reshape(k, size).all(1)


# --- one tensor ------------------------------------------------------------------------------


def check_tensor(task: "TensorTask", inputs: "TensorInputs", published: "torch.Tensor") -> dict[str, Any]:
    """Whether each element of `published` (the published tensor, its own dtype and shape)
    is a value the recipe allows, and how many entries each model kept (json-able):
    {name, method, elements, unmatched, models: [{model, density, kept, tested, kept_share,
    expected_share, band, z, p_value, scale, ...}], problems: [str]}."""
    name = task.name
    if not supports(task.method.name):
        raise AuditError(f"tensor {name}: merge method {task.method.name} is not random; compare its bytes")
    elements = math.prod(task.shape)
    if published.dtype != torch_dtype(task.dtype) or tuple(published.shape) != task.shape:
        return {"name": name, "method": task.method.name, "elements": elements, "unmatched": elements,
                "models": [], "problems": [
                    f"tensor {name}: published as {published.dtype} {list(published.shape)}, the recipe "
                    f"makes {torch_dtype(task.dtype)} {list(task.shape)}"]}
    if task.method.name == "arcee_fusion":
        return _check_fusion(task, inputs, published)
    if len(task.models) > MAX_MODELS:
        raise AuditError(
            f"tensor {name}: {len(task.models)} merged models; the element-by-element audit of random "
            f"methods tries every subset of kept models (2^n values per element) and handles at most "
            f"{MAX_MODELS}; compare fewer models or audit the bytes of a seeded re-run")
    frame = _frame(task, inputs, published)
    ratios, records, others = _estimate(frame)
    tally = _tally(frame, ratios)
    if not bool(tally.matched.all()):
        better, alternatives = _rescan(frame, ratios, records, tally)
        moved = _tally(frame, better)
        if int(moved.matched.sum()) >= int(tally.matched.sum()):
            ratios, tally, others = better, moved, alternatives
    ratios, tally, allowed = _prefer_l1(frame, ratios, records, tally)
    if not _explained(tally, ratios, allowed):
        ratios, tally, allowed = _sweep(frame, ratios, records, tally, allowed, others)
    return _report(frame, ratios, records, tally, allowed)


def _explained(tally: Tally, ratios: Sequence, allowed: Mapping[int, tuple[float, float]]) -> bool:
    """Every element matched, every factor within its L1 range."""
    return bool(tally.matched.all()) and all(lo <= float(ratios[i]) <= hi for i, (lo, hi) in allowed.items())


def _sweep(frame: Frame, ratios: Sequence, records: Sequence[dict], tally: Tally,
           allowed: Mapping[int, tuple[float, float]], others: Sequence[Mapping[int, tuple[int, int]]]):
    """The statuses the values reveal follow the factors, so an L1 range computed at one
    factor may miss the true one: try the masks' enumeration (`_complete`) at the current
    factors, then the equally good alternatives of the joint search, each on its own (its
    statuses, its L1 ranges) and with the enumeration from its statuses. The first that
    explains every value wins; else nothing changes. Returns (ratios, tally, allowed)."""
    for cells in [None, *others, *_other_boxes(frame, ratios, records, tally)]:
        trial, t = list(ratios), tally
        if cells is not None:
            for i, cell in cells.items():
                trial[i] = _scalar(sum(cell) // 2, frame.work_dtype)
            t = _tally(frame, trial)
            limits = {i: _l1_allowed(frame, i, t) for i in allowed}
            if _explained(t, trial, limits):
                _chosen(records, trial, "swept")
                return trial, t, limits
        completed = _complete(frame, records, t)
        if completed is not None:
            t = _tally(frame, completed)
            limits = {i: _l1_allowed(frame, i, t) for i in allowed}
            if _explained(t, completed, limits):
                _chosen(records, completed, "completed")
                return completed, t, limits
    return list(ratios), tally, dict(allowed)


def _other_boxes(frame: Frame, ratios: Sequence, records: Sequence[dict], tally: Tally):
    """For a model whose box came from the weak vote (no element where it alone has a nonzero
    entry), the joint search within each of its less voted regions instead, on the elements
    `_evaluation_set` takes: the cells found, one combination per region (a generator: only
    searched when reached)."""
    boxes = {i: tuple(r["box_bits"]) for i, r in enumerate(records) if r.get("box_bits")}
    for i, record in enumerate(records):
        for box in record.get("other_boxes", []):
            _, cells, _ = _search(_evaluation_set(frame, tally), ratios, {**boxes, i: tuple(box)})
            yield cells


def _chosen(records: Sequence[dict], ratios: Sequence, how: str) -> None:
    for i, r in enumerate(ratios):
        if r is not None and records[i].get("region_bits"):
            records[i].update(region_bits=[_bits_of_scalar(r)] * 2, **{how: True})


# --- statistics ------------------------------------------------------------------------------


def two_sided_p(z: float) -> float:
    """P(|Z| >= z) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2))


def critical_z(p: float) -> float:
    """The z with two_sided_p(z) == p (bisection: no scipy)."""
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if two_sided_p(mid) > p else (lo, mid)
    return (lo + hi) / 2


def _exact_tail_p(kept: int, probs: "torch.Tensor") -> float:
    """Twice the smaller tail of a sum of Bernoulli(probs) at `kept` (at most 1): exact
    (binomial closed form; Poisson-binomial by dynamic programming up to EXACT_UP_TO
    entries), else normal with continuity correction."""
    import torch

    k = probs.numel()
    mean = float(probs.sum())
    sd = math.sqrt(float((probs * (1 - probs)).sum()))
    if k == 0 or sd == 0:
        return 1.0 if kept == round(mean) else 0.0
    if bool((probs == probs[0]).all()):  # binomial
        q = float(probs[0])
        counts = torch.arange(k + 1, dtype=torch.float64)
        pmf = (math.lgamma(k + 1) - torch.lgamma(counts + 1) - torch.lgamma(k - counts + 1)
               + counts * math.log(q) + (k - counts) * math.log1p(-q)).exp()
    elif k <= EXACT_UP_TO:  # Poisson-binomial, one entry at a time
        pmf = torch.zeros(k + 1, dtype=torch.float64)
        pmf[0] = 1
        for j, q in enumerate(probs.tolist()):
            pmf[1:j + 2] = pmf[1:j + 2] * (1 - q) + pmf[:j + 1] * q
            pmf[0] *= 1 - q
    else:
        return two_sided_p(max(0.0, abs(kept - mean) - 0.5) / sd)
    return min(1.0, 2 * min(float(pmf[:kept + 1].sum()), float(pmf[kept:].sum())))


def kept_count_test(kept: int, probs: "torch.Tensor", margin: float = 0.0) -> dict[str, float]:
    """How unusual `kept` is for a sum of Bernoulli(probs) (float64, (k,)), each probability
    known only to within +- `margin`: mean and sd under `probs`, z, and the two-sided p-value
    against the nearest of the shifted probabilities (1 when `kept` lies between their
    means)."""
    mean = float(probs.sum())
    sd = math.sqrt(float((probs * (1 - probs)).sum()))
    z = (kept - mean) / sd if sd > 0 else (0.0 if kept == mean else math.inf)
    low, high = (probs - margin).clamp(0, 1), (probs + margin).clamp(0, 1)
    if float(low.sum()) <= kept <= float(high.sum()):
        p = 1.0
    else:
        p = _exact_tail_p(kept, low if kept < float(low.sum()) else high)
    return {"mean": mean, "sd": sd, "z": z, "p_value": p, "margin": margin}


def _probabilities(frame: Frame, i: int) -> "torch.Tensor":
    """Model i's keep probability of each entry, flat float64 (N,)."""
    task = frame.task
    params = task.params[i]
    delta = frame.work[i].to(frame.compute).reshape(task.shape)
    if frame.steps.sparsification == "della_magprune":
        probs = della_probabilities(della_rows(delta), params["density"], params["epsilon"])
    else:
        probs = dare_probabilities(delta, params["density"])
    return probs.reshape(-1).double()


# --- one tensor ------------------------------------------------------------------------------


SUM_ERROR = 1e-5  # relative error bound of a float32 sum of non-negative terms (cascade summation)


SUM_ERROR = 1e-5  # relative error bound of a float32 sum of non-negative terms (cascade summation)


def _rounded(value: float, dtype: "torch.dtype", up: bool) -> float:
    """`value` (>= 0) rounded to `dtype` toward +inf (`up`) or toward 0."""
    bits = _bits_of(value, dtype)
    near = _value_of(bits, dtype)
    if up and near < value:
        bits += 1
    elif not up and near > value:
        bits -= 1
    return _value_of(bits, dtype)


def _l1_allowed(frame: Frame, i: int, tally: Tally) -> tuple[float, float]:
    """The factors |d_i|_1 / |d_i * m_i|_1 the revealed statuses allow, with mergekit's
    roundings: `after` (float32 sum, rounded to the work dtype) of any mask between the known
    kept entries and those plus the unknown ones, divided into `before` in the work dtype."""
    import torch

    work = frame.work_dtype
    before = frame.work[i].abs().sum()  # 0-d, the work dtype: as mergekit's `l1_ratio`
    low = tally.after_low[i] * (1 - SUM_ERROR)
    high = (tally.after_low[i] + tally.after_unknown[i]) * (1 + SUM_ERROR)
    least, most = _rounded(low, work, up=False), _rounded(high, work, up=True)
    divide = lambda after: float(before / torch.tensor(after, dtype=work))  # noqa: E731
    top = divide(least) if least > 0 else math.inf
    bottom = divide(most) if most > 0 else 1.0
    if least < frame.task.release.rescale_min_norm:  # a mask this light is not rescaled: factor 1
        bottom = 1.0
    return bottom, top


def _report(frame: Frame, ratios: Sequence, records: Sequence, tally: Tally,
            allowed: Mapping[int, tuple[float, float]]) -> dict[str, Any]:
    task, name = frame.task, frame.task.name
    elements = frame.base.numel()
    unmatched = elements - int(tally.matched.sum())
    problems = []
    if unmatched:
        problems.append(f"tensor {name}: {unmatched:,} of {elements:,} elements match no allowed value")
    work = work_dtype(frame.compute)
    models = []
    for i, src in enumerate(task.models):
        params = task.params[i]
        entry: dict[str, Any] = {"model": src.model, "density": params["density"],
                                 "rescale": frame.rules[i], "drawn": i in frame.free}
        if "epsilon" in params:
            entry["epsilon"] = params["epsilon"]
        if i in frame.free:
            tested = int(tally.tested[i].sum())
            kept = int(tally.kept[i].sum())
            probs = _probabilities(frame, i)[tally.tested[i]]
            stats = kept_count_test(kept, probs, DENSITY_MARGIN)
            share, sd = (stats["mean"] / tested, stats["sd"] / tested) if tested else (None, None)
            width = DENSITY_MARGIN + BAND_Z * sd if tested else None
            entry.update(tested=tested, kept=kept, kept_share=kept / tested if tested else None,
                         expected_share=share, sd_share=sd, margin=DENSITY_MARGIN,
                         band=[share - width, share + width] if tested else None,
                         band_z=BAND_Z, z=stats["z"], p_value=stats["p_value"],
                         expected=stats["mean"], sd=stats["sd"])
        scale = ratios[i]
        entry["scale"] = float(scale) if scale is not None else (
            float(kept_entries(_one(work), frame.rules[i], params["density"])) if i in frame.free else 1.0)
        if records[i].get("region_bits"):
            lo, hi = records[i]["region_bits"]
            entry["scale_range"] = [_value_of(lo, work), _value_of(hi, work)]
            entry["search"] = {k: v for k, v in records[i].items() if not k.endswith(("_bits", "_boxes"))}
            entry["search"]["box"] = [_value_of(b, work) for b in records[i]["box_bits"]]
        if i in allowed:
            entry["l1_allowed"] = list(allowed[i])
            lo, hi = allowed[i]
            if not (lo <= entry["scale"] <= hi):
                a, b = entry["scale_range"]
                problems.append(
                    f"tensor {name}, model {src.model}: the published values scale its kept entries by "
                    f"{_span(a, b)}, but the L1-norm ratio of any mask consistent with them lies in "
                    f"{_span(lo, hi)} (weight {params['weight']:g}, lambda {task.shared['lambda']:g} "
                    f"as the recipe states cannot give these values)")
        models.append(entry)
    return {"name": name, "method": task.method.name, "elements": elements, "unmatched": unmatched,
            "models": models, "problems": problems}


def _one(dtype: "torch.dtype") -> "torch.Tensor":
    import torch

    return torch.ones((), dtype=dtype)


def _span(a: float, b: float) -> str:
    return f"{a:.6g}" if a == b else f"{a:.6g}..{b:.6g}"


# --- arcee_fusion -------------------------------------------------------------------------


def _importance(base: "torch.Tensor", x: "torch.Tensor") -> "torch.Tensor":
    """arcee_fusion's importance of each entry (as `arcee_fusion.arcee_fusion` computes it,
    in the compute dtype; tests/test_audit_elementwise.py checks that the two agree)."""
    import torch

    diff = (x - base).abs()
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _threshold_range(importance: "torch.Tensor", sample: int) -> tuple[float, float]:
    """The values median + 1.5 IQR of `sample` entries drawn with replacement can take:
    each sampled quantile's population rank within +- ARCEE_Z binomial sd."""
    import torch

    ordered, _ = torch.sort(importance.reshape(-1))
    total = ordered.numel()

    def quantile(q: float, side: int) -> "torch.Tensor":
        rank = (math.floor(q * (sample - 1)) + 1) / sample  # the order statistic arcee reads
        u = rank + side * (ARCEE_Z * math.sqrt(q * (1 - q) / sample) + 1 / sample)
        return ordered[min(total - 1, max(0, math.floor(u * total)))]

    low = quantile(0.5, -1) + 1.5 * (quantile(0.75, -1) - quantile(0.25, +1))
    high = quantile(0.5, +1) + 1.5 * (quantile(0.75, +1) - quantile(0.25, -1))
    return float(low), float(high)


def _check_fusion(task: "TensorTask", inputs: "TensorInputs", published: "torch.Tensor") -> dict[str, Any]:
    import torch

    name, out = task.name, torch_dtype(task.dtype)
    base, x = inputs.base(), inputs.model(0)
    theirs = _bits(published)
    elements = theirs.numel()
    entry: dict[str, Any] = {"name": name, "method": "arcee_fusion", "elements": elements, "models": []}
    if elements <= fusion.SAMPLE:  # exact quantiles: deterministic, the method's own bytes
        ours = _bits(fusion.arcee_fusion(base, x, task.seeds[0]).to(out))
        unmatched = int((ours != theirs).sum())
        entry.update(exact=True, unmatched=unmatched,
                     problems=[f"tensor {name}: {unmatched:,} of {elements:,} elements differ from the "
                               "recipe's (deterministic at this size)"] if unmatched else [])
        return entry
    change = x - base
    kept = _bits((base + change * torch.ones(base.shape, dtype=torch.float32)).to(out))
    dropped = _bits((base + change * torch.zeros(base.shape, dtype=torch.float32)).to(out))
    importance = _importance(base, x).reshape(-1).double()
    shows = kept != dropped  # where the two outcomes differ
    is_kept, is_dropped = shows & (theirs == kept), shows & (theirs == dropped)
    unmatched = int((~((theirs == kept) | (theirs == dropped))).sum())
    min_kept = float(importance[is_kept].min()) if bool(is_kept.any()) else math.inf
    max_dropped = float(importance[is_dropped].max()) if bool(is_dropped.any()) else -math.inf
    low, high = _threshold_range(importance.to(base.dtype), fusion.SAMPLE)
    problems = []
    if unmatched:
        problems.append(f"tensor {name}: {unmatched:,} of {elements:,} elements are neither the base's "
                        "nor the fine-tune's value")
    if min_kept <= max_dropped:
        inverted = int((importance[is_dropped] >= min_kept).sum())
        problems.append(f"tensor {name}: the kept entries are not the most important ones ({inverted:,} "
                        f"dropped entries matter at least as much as the least important kept one)")
    elif not (max_dropped < high and min_kept >= low):
        problems.append(f"tensor {name}: the published values cut the importances between "
                        f"{max_dropped:.6g} and {min_kept:.6g}; median + 1.5 IQR of a sample of "
                        f"{fusion.SAMPLE:,} lies in {low:.6g}..{high:.6g}")
    entry.update(exact=False, unmatched=unmatched, kept=int(is_kept.sum()), dropped=int(is_dropped.sum()),
                 cut=[max_dropped, min_kept], threshold_range=[low, high], problems=problems)
    return entry


# --- all tensors -------------------------------------------------------------------------


def summarize(checks: Iterable[Mapping[str, Any]], alpha: float = ALPHA) -> dict[str, Any]:
    """The verdict over every checked tensor: each value allowed, each factor L1-consistent,
    and no kept share (per tensor and model, and pooled per model) beyond the Bonferroni
    threshold alpha / m."""
    checks = list(checks)
    problems = [p for c in checks for p in c["problems"]]
    tests = [(c, m) for c in checks for m in c["models"] if m.get("tested")]
    pooled: dict[str, dict[str, Any]] = {}
    for c, m in tests:
        acc = pooled.setdefault(m["model"], dict(tensors=0, tested=0, kept=0, expected=0.0, var=0.0))
        acc["tensors"] += 1
        acc["tested"] += m["tested"]
        acc["kept"] += m["kept"]
        acc["expected"] += m["expected"]
        acc["var"] += m["sd"] ** 2
    count = len(tests) + len(pooled)
    per_test = alpha / count if count else alpha
    z = critical_z(per_test)
    for c, m in tests:
        if m["p_value"] < per_test:
            problems.append(f"tensor {c['name']}, model {m['model']}: {_share_text(m, z)}")
    models = {}
    for ref, acc in pooled.items():
        sd = math.sqrt(acc["var"])
        gap = abs(acc["kept"] - acc["expected"]) - DENSITY_MARGIN * acc["tested"]  # beyond the margin
        p = 1.0 if gap <= 0 else (two_sided_p(max(0.0, gap - 0.5) / sd) if sd > 0 else 0.0)
        models[ref] = {"tensors": acc["tensors"], "tested": acc["tested"], "kept": acc["kept"],
                       "kept_share": acc["kept"] / acc["tested"],
                       "expected_share": acc["expected"] / acc["tested"],
                       "z": (acc["kept"] - acc["expected"]) / sd if sd > 0 else 0.0, "p_value": p}
        if p < per_test:
            problems.append(f"model {ref}, all tensors: kept {acc['kept'] / acc['tested']:.1%} of "
                            f"{acc['tested']:,} testable entries where the recipe allows "
                            f"{acc['expected'] / acc['tested']:.1%} ± "
                            f"{DENSITY_MARGIN + z * sd / acc['tested']:.1%} "
                            f"({DENSITY_MARGIN:.0%} + {z:.1f} sd, p = {p:.2g})")
    return {"verdict": INCONSISTENT if problems else CONSISTENT, "problems": problems,
            "tensors": len(checks), "models": models,
            "threshold": {"alpha": alpha, "tests": count, "per_test": per_test, "z": z}}


def _share_text(m: Mapping[str, Any], z: float) -> str:
    """The share test's message, e.g. kept 31.0% of 212 testable entries where density 0.5
    allows 50.0% ± 20.4% (1% + 5.6 sd, p = 3e-09): the margin plus z (the threshold's) sd."""
    tested, kept, expected, sd = m["tested"], m["kept"], m["expected"], m["sd"]
    margin = m.get("margin", 0.0)
    rule = f"density {m['density']:g}" + (f" ± epsilon {m['epsilon']:g}" if "epsilon" in m else "")
    return (f"kept {kept / tested:.1%} of {tested:,} testable entries where {rule} allows "
            f"{expected / tested:.1%} ± {margin + z * sd / tested:.1%} "
            f"({margin:.0%} + {z:.1f} sd, p = {m['p_value']:.2g})")
