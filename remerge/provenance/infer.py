"""Recipes from the weights: given a published model and candidate parents, estimate how it
was merged, write the estimate as a recipe, and let the audit re-merge it.

    frankenmerge     every published layer equals, tensor for tensor (sha256 of the bytes in
                     the published dtype), one layer of one candidate: a passthrough recipe
                     in the `slices:` form, one slice per run of consecutive source layers
    linear           published ~ sum_i c_i x_i              (least squares, float64)
    task_arithmetic  published - base ~ sum_i w_i d_i        (d_i = x_i - base)
    slerp            t from the projection onto the chord between base and model
    ties             each model keeps the top k_i of |d_i|: the first unchanged element of its
                     ranking bounds k_i, hence the density; the weights' ratios come from the
                     elements where several kept entries agree in sign

Estimates come from a few sample tensors (the largest ones every model has). People write
round parameters (0.5, 0.53, 0.7/0.3), so each estimate is turned into a short list of
rounded recipes; each is checked on the sample tensors with the merge's own function
(`merge_tensor`, what a merge computes), and the best goes to the caller, who re-merges
it in full (`remerge.provenance.audit.audit_model`). Nothing here decides a verdict.

Shapes: a sample tensor is flattened, `(n,)`; a model's inputs stack to `(k, n)`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from remerge.errors import AuditError
from remerge.io.safetensors import DTYPE_NAMES, ModelFolder, torch_dtype
from remerge.merge.architecture import layer_index
from remerge.merge.recipe import dump_recipe

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SAMPLES = 6  # sample tensors the estimates and the quick checks use
FLOATS = ("BF16", "F16", "F32", "F64")


@dataclass
class Estimate:
    """One candidate recipe and how well it reproduces the sample tensors."""

    method: str
    recipe: str  # YAML text
    why: str  # what the estimate rests on, in words
    identical: int = 0  # sample tensors reproduced bit for bit
    differing_elements: int = 0  # over the sample tensors
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"method": self.method, "recipe": self.recipe, "why": self.why,
                "sample_tensors_identical": self.identical,
                "sample_differing_elements": self.differing_elements, **self.details}


# --- reading ---------------------------------------------------------------------------------


def _float64(folder: ModelFolder, name: str, dtype: str) -> "torch.Tensor":
    """A tensor cast to the compute dtype first (what mergekit computes in), then to float64."""
    return folder.view(name).to(torch_dtype(dtype)).double().reshape(-1)


def task_vector(x: "torch.Tensor", base: "torch.Tensor", dtype: str) -> "torch.Tensor":
    """x - base rounded to the compute dtype, as mergekit's task vectors are (its ranking of
    magnitudes sees those rounded values, with their ties), in float64."""
    return (x - base).to(torch_dtype(dtype)).double()


def sample_names(published: ModelFolder, candidates: Mapping[str, ModelFolder]) -> list[str]:
    """Floating tensors that the published model and every candidate have with the same
    shape: the largest ones, and the largest of the first, middle and last layers (a merge
    may treat layers differently: gradients, frankenmerges), `SAMPLES` in all, stable."""
    common = [n for n, info in published.tensors.items() if info.dtype in FLOATS and all(
        c.has(n) and tuple(c.info(n).shape) == tuple(info.shape) for c in candidates.values())]
    common.sort(key=lambda n: (-published.info(n).numel, n))
    layers = sorted({i for n in common if (i := layer_index(n)) is not None})
    picked = [next(n for n in common if layer_index(n) == i)
              for i in dict.fromkeys(layers[k] for k in (0, len(layers) // 2, -1))] if layers else []
    for name in common:
        if len(picked) >= SAMPLES:
            break
        if name not in picked:
            picked.append(name)
    return sorted(picked, key=common.index)  # the largest first: the estimates start from it


# --- frankenmerges: layers by digest ---------------------------------------------------------


def _digest(folder: ModelFolder, name: str, dtype: str) -> str:
    """sha256 of a tensor's bytes in `dtype` (a passthrough casts to the recipe's dtype)."""
    import torch

    tensor = folder.view(name).to(torch_dtype(dtype))  # no copy when already in `dtype`
    return hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def _layers(folder: ModelFolder, dtype: str) -> dict[int, dict[str, str]]:
    """{layer: {name without the layer number: digest}} of a model's decoder layers."""
    out: dict[int, dict[str, str]] = {}
    for name in folder.tensors:
        index = layer_index(name)
        if index is not None:
            out.setdefault(index, {})[name.replace(f"layers.{index}.", "layers.#.", 1)] = _digest(folder, name, dtype)
    return out


def layer_sources(published: ModelFolder, candidates: Mapping[str, ModelFolder],
                  dtype: str) -> list[tuple[str, int]] | None:
    """For each published layer in order, the (candidate, layer) whose tensors have exactly
    its bytes; None when some layer has no such source (not a frankenmerge of these)."""
    theirs = _layers(published, dtype)
    if not theirs:
        return None
    sources = {(ref, i): layer for ref, folder in candidates.items() for i, layer in _layers(folder, dtype).items()}
    by_content = {}
    for key, layer in sources.items():
        by_content.setdefault(tuple(sorted(layer.items())), key)  # first candidate wins a tie
    found = []
    for index in sorted(theirs):
        key = by_content.get(tuple(sorted(theirs[index].items())))
        if key is None:
            return None
        found.append(key)
    return found


def slices_of(sources: Sequence[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """Runs of consecutive layers of one model: [(model, start, end)] with end exclusive."""
    runs: list[tuple[str, int, int]] = []
    for ref, layer in sources:
        if runs and runs[-1][0] == ref and runs[-1][2] == layer:
            runs[-1] = (ref, runs[-1][1], layer + 1)
        else:
            runs.append((ref, layer, layer + 1))
    return runs


def frankenmerge_recipe(runs: Sequence[tuple[str, int, int]], dtype: str) -> str:
    return dump_recipe({
        "slices": [{"sources": [{"model": ref, "layer_range": [start, end]}]} for ref, start, end in runs],
        "merge_method": "passthrough",
        "dtype": DTYPE_NAMES[dtype],
    })


# --- rounding: the values people write ------------------------------------------------------


def rounded(values: Sequence[float], digits: int) -> tuple[float, ...]:
    return tuple(round(v, digits) for v in values)


def absolute_forms(values: Sequence[float]) -> list[tuple[float, ...]]:
    """Weights whose scale matters: the estimate rounded to 1..4 decimals."""
    return list(dict.fromkeys(rounded(values, d) for d in range(1, 5)))


def scale_free_forms(values: Sequence[float], tolerance: float = 3e-3) -> list[tuple[float, ...]]:
    """Weights known up to a common factor (normalized methods): every scaling that makes all
    of them round numbers within `tolerance` (relative), the simplest first. Anchors: each
    weight set to a round value in 0.05 .. 1 or to an integer 1 .. 10."""
    positive = [v for v in values if v > 0]
    if not positive:
        return []
    anchors = [round(0.05 * i, 2) for i in range(1, 21)] + [float(i) for i in range(2, 11)]
    found: dict[tuple[float, ...], int] = {}
    for v, anchor in product(positive, anchors):
        scale = anchor / v
        for digits in (1, 2, 3):
            form = rounded([x * scale for x in values], digits)
            if all(abs(f - x * scale) <= tolerance * max(abs(x * scale), 1e-12) for f, x in zip(form, values)) \
                    and all(f > 0 for f in form):
                found.setdefault(form, digits)
                break
    # simplest first: fewest decimals, then smallest sum (0.7/0.3 before 7/3)
    return sorted(found, key=lambda f: (found[f], sum(f)))[:12]


def density_candidates(low: float, high: float, most: int = 6) -> list[float]:
    """Round densities in [low, high) (the bounds from the data): one decimal, then two,
    then three; at most `most`, nearest the interval's middle first within each."""
    middle = (low + high) / 2
    out: list[float] = []
    for digits in (1, 2, 3):
        step = 10.0 ** -digits
        values = [round(i * step, digits) for i in range(int(low / step), int(high / step) + 2)]
        inside = sorted((v for v in values if low <= v < high and 0 < v <= 1 and v not in out),
                        key=lambda v: abs(v - middle))
        out += inside
    if high > 1:  # nothing visibly dropped: keeping everything is the simplest explanation
        out = [1.0] + [v for v in out if v != 1.0]
    return out[:most] or [round(min(max(middle, 1e-3), 1.0), 4)]


# --- numeric estimates -------------------------------------------------------------------------


def least_squares(target: "torch.Tensor", columns: Sequence["torch.Tensor"]) -> list[float]:
    """c minimizing |target - sum_i c_i columns_i| (float64)."""
    import torch

    matrix = torch.stack(list(columns), dim=1)  # (n, k)
    return [float(c) for c in torch.linalg.lstsq(matrix, target.unsqueeze(1)).solution.reshape(-1)]


def changed(out: "torch.Tensor", base: "torch.Tensor") -> "torch.Tensor":
    return out != base


def informative(delta: "torch.Tensor", base: "torch.Tensor", dtype: str) -> "torch.Tensor":
    """Where a change of size |delta| could not vanish in the rounding to the compute dtype."""
    import torch

    eps = torch.finfo(torch_dtype(dtype)).eps
    return delta.abs() > 2 * eps * base.abs()


def density_interval(delta: "torch.Tensor", out: "torch.Tensor", x: "torch.Tensor",
                     others: Sequence["torch.Tensor"], base: "torch.Tensor", dtype: str) -> tuple[float, float]:
    """[low, high) holding a TIES density, from one tensor (flattened, float64).

    Each model keeps its top k = int(density * n) entries by |delta|; the ranking's order
    among equal magnitudes is the sort's, so bounds are by value:
    - an informative unchanged element of magnitude v is dropped: k < #{|delta| >= v};
    - an element where the published value is this model's own value and no other's (nor
      the base's) was kept: k > #{|delta| > w} for the smallest such magnitude w.
    """
    magnitude = delta.abs()
    dropped = ~changed(out, base) & informative(delta, base, dtype) & (magnitude > 0)
    high = int((magnitude >= magnitude[dropped].max()).sum()) if bool(dropped.any()) else delta.numel() + 1
    own = (out == x) & changed(out, base)
    for other in others:
        own &= out != other
    low = int((magnitude > magnitude[own].min()).sum()) + 1 if bool(own.any()) else 1
    n = delta.numel()
    return low / n, high / n


def ties_masks(deltas: Sequence["torch.Tensor"], densities: Sequence[float]) -> list["torch.Tensor"]:
    """Approximate top-k masks (ties at the cut do not matter for estimating weights)."""
    import torch

    masks = []
    for d, rho in zip(deltas, densities):
        k = max(1, int(rho * d.numel()))
        mask = torch.zeros(d.numel(), dtype=torch.bool)
        mask[torch.topk(d.abs(), k).indices] = True
        masks.append(mask)
    return masks


def agreeing_kept(deltas: "torch.Tensor", masks: Sequence["torch.Tensor"]) -> "torch.Tensor":
    """Elements where every model's entry is kept and all share one nonzero sign: there all
    pass the sign election, so the published step is a plain (normalized) weighted sum."""
    import torch

    signs = deltas.sign()  # (k, n)
    kept = torch.stack(list(masks)).all(dim=0)  # (n,)
    return kept & (signs == signs[0]).all(dim=0) & (signs[0] != 0)


def ties_weights(deltas: Sequence["torch.Tensor"], masks: Sequence["torch.Tensor"],
                 step: "torch.Tensor") -> tuple[list[float], list[float]] | None:
    """(weights up to a factor if normalized, absolute weights if not), from the agreeing
    kept elements: normalized, step * sum w_i = sum w_i d_i, i.e. sum_i w_i (d_i - step) = 0
    (the smallest right singular vector); not normalized, step = sum w_i d_i (least squares)."""
    import torch

    stacked = torch.stack(list(deltas))  # (k, n)
    rows = agreeing_kept(stacked, masks)
    if int(rows.sum()) < len(deltas):
        return None
    absolute = least_squares(step[rows], list(stacked[:, rows]))
    if len(deltas) == 1:
        return [1.0], absolute
    vector = torch.linalg.svd((stacked[:, rows] - step[rows]).T, full_matrices=False).Vh[-1]
    vector = vector * (1 if float(vector.sum()) >= 0 else -1)
    return [float(v) for v in vector], absolute


# --- recipes ---------------------------------------------------------------------------------


def models_recipe(method: str, entries: Sequence[tuple[str, Mapping[str, float]]], dtype: str,
                  base: str | None = None, parameters: Mapping[str, Any] | None = None) -> str:
    data: dict[str, Any] = {"models": [{"model": ref, **({"parameters": dict(p)} if p else {})}
                                       for ref, p in entries],
                            "merge_method": method}
    if base is not None:
        data["base_model"] = base
    if parameters:
        data["parameters"] = dict(parameters)
    data["dtype"] = DTYPE_NAMES[dtype]
    return dump_recipe(data)


def linear_estimates(out, xs: Mapping[str, "torch.Tensor"], dtype: str) -> Iterator[Estimate]:
    refs = list(xs)
    coeffs = least_squares(out, [xs[r] for r in refs])
    kept = [(r, c) for r, c in zip(refs, coeffs) if abs(c) > MEMBER]
    why = "least squares over the sample tensors: " + ", ".join(f"{r} {c:.4f}" for r, c in zip(refs, coeffs))
    for form in scale_free_forms([c for _, c in kept]):
        entries = [(r, {"weight": w}) for (r, _), w in zip(kept, form)]
        yield Estimate("linear", models_recipe("linear", entries, dtype), why)
    for form in absolute_forms([c for _, c in kept]):
        entries = [(r, {"weight": w}) for (r, _), w in zip(kept, form)]
        yield Estimate("linear", models_recipe("linear", entries, dtype, parameters={"normalize": False}), why)


def task_arithmetic_weights(out, base, xs: Mapping[str, "torch.Tensor"], dtype: str) -> dict[str, float]:
    """{candidate: w} with published - base ~ sum_i w_i d_i (least squares)."""
    refs = list(xs)
    return dict(zip(refs, least_squares(out - base, [task_vector(xs[r], base, dtype) for r in refs])))


MEMBER = 0.02  # a candidate whose task vector enters with less than this is not a parent


def task_arithmetic_estimates(weights: Mapping[str, float], base_ref: str, dtype: str) -> Iterator[Estimate]:
    kept = [(r, c) for r, c in weights.items() if abs(c) > MEMBER]
    why = "least squares on the task vectors: " + ", ".join(f"{r} {c:.4f}" for r, c in weights.items())
    for form in absolute_forms([c for _, c in kept]):
        entries = [(r, {"weight": w}) for (r, _), w in zip(kept, form)]
        yield Estimate("task_arithmetic", models_recipe("task_arithmetic", entries, dtype, base_ref), why)


def slerp_t(out: "torch.Tensor", a: "torch.Tensor", b: "torch.Tensor") -> float:
    """Where `out` lies between a (t = 0) and b (t = 1): the projection onto b - a (slerp
    is close to the chord for the small angles between a model and its fine-tune)."""
    chord = b - a
    return float((out - a).dot(chord) / chord.dot(chord)) if bool(chord.any()) else 0.0


def slerp_estimates(samples: Sequence[tuple[str, "torch.Tensor", Mapping[str, "torch.Tensor"]]],
                    dtype: str) -> Iterator[Estimate]:
    """Each ordered pair of candidates (base, other), t from the largest sample."""
    _, out, xs = samples[0]
    for base_ref, other in product(xs, xs):
        if base_ref == other:
            continue
        t = slerp_t(out, xs[base_ref], xs[other])
        if not -0.01 <= t <= 1.01:
            continue
        for value in dict.fromkeys(round(t, d) for d in (1, 2, 3)):
            yield Estimate("slerp", models_recipe("slerp", [(other, {})], dtype, base_ref, {"t": value}),
                           f"t {t:.4f} from the projection onto the chord {base_ref} -> {other}")


def ties_estimates(samples: Sequence[tuple["torch.Tensor", "torch.Tensor", Mapping[str, "torch.Tensor"]]],
                   base_ref: str, dtype: str) -> Iterator[Estimate]:
    """samples: [(out, base, {ref: x})] flattened. Densities bounded per model over all
    samples, weights from the agreeing kept elements of the largest sample."""
    refs = list(samples[0][2])
    bounds = {}
    for r in refs:
        intervals = [density_interval(task_vector(xs[r], base, dtype), out, xs[r], [xs[o] for o in refs if o != r], base, dtype)
                     for out, base, xs in samples]
        bounds[r] = (max(lo for lo, _ in intervals), min(hi for _, hi in intervals))
    out, base, xs = samples[0]
    deltas = [task_vector(xs[r], base, dtype) for r in refs]
    for densities in product(*(density_candidates(*bounds[r]) for r in refs)):
        weights = ties_weights(deltas, ties_masks(deltas, densities), out - base)
        if weights is None:
            continue
        ratios, absolute = weights
        why = ("densities bounded by each model's kept and dropped magnitudes ("
               + ", ".join(f"{r} in [{bounds[r][0]:.4f}, {bounds[r][1]:.4f})" for r in refs) + "); weight ratios "
               + ", ".join(f"{v:.4f}" for v in ratios))
        for form in scale_free_forms(ratios, tolerance=0.02)[:4]:
            entries = [(r, {"weight": w, "density": rho}) for r, w, rho in zip(refs, form, densities)]
            yield Estimate("ties", models_recipe("ties", entries, dtype, base_ref), why)
        for form in absolute_forms(absolute)[:2]:
            entries = [(r, {"weight": w, "density": rho}) for r, w, rho in zip(refs, form, densities)]
            yield Estimate("ties", models_recipe("ties", entries, dtype, base_ref, {"normalize": False}),
                           why + f"; not normalized: weights {', '.join(f'{v:.4f}' for v in absolute)}")


# --- checking an estimate on the samples -------------------------------------------------------


def check_on_samples(estimate: Estimate, published: ModelFolder, folders: Mapping[str, Path],
                     names: Sequence[str], version: str | None) -> Estimate:
    """Fill in how many sample tensors the estimate reproduces (the merge's own function)."""
    import numpy as np

    from remerge.errors import RemergeError
    from remerge.merge.plan import plan_merge
    from remerge.merge.recipe import parse_recipe
    from remerge.merge.tensor import merge_tensor, plan_tensor

    try:
        recipe = parse_recipe(estimate.recipe, version=version)
        plan = plan_merge(recipe, {ref: folders[ref] for ref in recipe.inputs})
    except RemergeError as err:
        estimate.details["refused"] = str(err)
        estimate.differing_elements = -1
        return estimate
    models = plan.open_models()
    estimate.identical, estimate.differing_elements = 0, 0
    for name in names:
        if name not in plan.tensors:
            continue
        ours = merge_tensor(plan_tensor(recipe, plan.tensors[name]), models)
        theirs = published.raw(name)
        if ours.shape == theirs.shape and np.array_equal(ours, theirs):
            estimate.identical += 1
        else:
            estimate.differing_elements += int((ours != theirs).sum()) if ours.shape == theirs.shape else theirs.size
    return estimate


def _rank(e: Estimate) -> tuple[int, int]:
    return (-e.identical, e.differing_elements if e.differing_elements >= 0 else 1 << 62)


# --- the whole inference ---------------------------------------------------------------------


def published_dtype(published: ModelFolder) -> str:
    dtypes = sorted({info.dtype for info in published.tensors.values() if info.dtype in FLOATS})
    if len(dtypes) != 1:
        raise AuditError(f"{published.path}: tensors of several dtypes ({', '.join(dtypes)}); "
                         "--infer needs one")
    return dtypes[0]


def estimates(published: ModelFolder, folders: Mapping[str, Path], base: str | None) -> Iterator[Estimate]:
    """Every candidate recipe, most specific first."""
    dtype = published_dtype(published)
    candidates = {ref: ModelFolder(path, label=ref) for ref, path in folders.items()}
    runs = layer_sources(published, candidates, dtype)
    if runs is not None:
        yield Estimate("passthrough", frankenmerge_recipe(slices_of(runs), dtype),
                       "every published layer has the bytes of one candidate layer (sha256)",
                       details={"layers": [f"{r}[{i}]" for r, i in runs]})
    names = sample_names(published, candidates)
    if not names:
        raise AuditError("no tensor that the published model and every candidate share: "
                         "give the models it was merged from (--candidate)")
    compute = DTYPE_NAMES[dtype]
    samples = []
    for name in names:
        out = published.view(name).double().reshape(-1)
        xs = {ref: _float64(folder, name, compute) for ref, folder in candidates.items()}
        samples.append((name, out, xs))
    out, xs = samples[0][1], samples[0][2]
    yield from linear_estimates(out, xs, dtype)
    yield from slerp_estimates(samples, dtype)
    for base_ref in ([base] if base else list(folders)):
        others = {r: x for r, x in xs.items() if r != base_ref}
        if not others:
            continue
        weights = task_arithmetic_weights(out, xs[base_ref], others, dtype)
        yield from task_arithmetic_estimates(weights, base_ref, dtype)
        members = [r for r, w in weights.items() if abs(w) > MEMBER]
        if members:
            yield from ties_estimates([(o, x[base_ref], {r: x[r] for r in members}) for _, o, x in samples],
                                      base_ref, dtype)


def infer_recipe(published: Path, folders: Mapping[str, Path], base: str | None = None,
                 version: str | None = None, limit: int = 400) -> dict[str, Any]:
    """The best estimate (the first to reproduce every sample tensor, else the closest) and
    the others tried, best first. `folders`: {candidate reference: its folder}."""
    theirs = ModelFolder(published)
    names = sample_names(theirs, {r: ModelFolder(p, label=r) for r, p in folders.items()})
    tried: list[Estimate] = []
    for estimate in estimates(theirs, folders, base):
        tried.append(check_on_samples(estimate, theirs, folders, names, version))
        if estimate.identical == len(names):
            break
        if len(tried) >= limit:
            break
    if not tried:
        raise AuditError("--infer found no candidate recipe")
    tried.sort(key=_rank)
    log.info("inferred %s (%d of %d sample tensors identical, %d estimates tried)",
             tried[0].method, tried[0].identical, len(names), len(tried))
    return {"best": tried[0].as_json(), "samples": names,
            "tried": [e.as_json() for e in tried[:10]], "estimates_tried": len(tried)}
