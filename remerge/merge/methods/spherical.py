"""Spherical interpolation: slerp, nuslerp, multislerp and the Karcher mean (mergekit's
`slerp.py`, `nuslerp.py`, `multislerp.py`, `karcher.py`).

Each treats a tensor as one vector (or, for nuslerp without flattening, each row or column
as one) and moves along the great circle between the inputs' directions, as mergekit 0.1.5
computes it: slerp in float32 (float64 for float64 inputs) over the flattened tensor in
chunks of 2^20 elements; nuslerp, multislerp and karcher in the inputs' dtype (karcher takes
its norms in float32). Shapes: every input `(*shape)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from remerge.errors import RecipeError
from remerge.lazy import lazy_import
from remerge.merge.methods import REQUIRED, MethodSpec, Parameter

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import torch

    from remerge.merge.tensor import TensorInputs, TensorTask
else:
    torch = lazy_import("torch")

DOT_THRESHOLD = 0.9995  # slerp: |cos| above this interpolates linearly (mergekit's constant)
EPS = 1e-8
CHUNK = 1 << 20  # slerp's norms and dot are sums of per-chunk values over this many elements


def _work_dtype(x: "torch.Tensor") -> "torch.dtype":
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --- slerp -----------------------------------------------------------------------------------


def _chunks(v: "torch.Tensor", work: "torch.dtype") -> list["torch.Tensor"]:
    """The (1, n) vector's chunks of CHUNK elements, in the working dtype (converted once:
    the norms, the dot and the result all read them)."""
    return [v[:, s:s + CHUNK].to(work) for s in range(0, v.shape[1], CHUNK)]


def _norm(chunks: list["torch.Tensor"]) -> "torch.Tensor":
    """The norm of the vector as mergekit takes it: the norm of its chunks' norms, (1, 1)."""
    norms = [torch.linalg.vector_norm(c, dim=1, keepdim=True) for c in chunks]
    return torch.linalg.vector_norm(torch.stack(norms), dim=0)


def slerp(t: float, v0: "torch.Tensor", v1: "torch.Tensor") -> "torch.Tensor":
    """From v0 (t = 0, the base) to v1 (t = 1) along the great circle; plain interpolation
    when the two are (anti)parallel beyond DOT_THRESHOLD. The result has v0's dtype."""
    work = _work_dtype(v0)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)  # (1, n): the whole tensor is one vector
    tt = torch.tensor([t], dtype=work).reshape(-1, 1)  # t is rounded to float32 first
    if a.numel() == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    ac, bc = _chunks(a, work), _chunks(b, work)  # 2 x 4 bytes per element while they live
    na, nb = _norm(ac), _norm(bc)
    na = torch.where(na > EPS, na, 1)  # a zero vector gets norm 1
    nb = torch.where(nb > EPS, nb, 1)
    dot = torch.stack([((x / na) * (y / nb)).sum(dim=1, keepdim=True) for x, y in zip(ac, bc)])
    dot = dot.sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    cb = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)  # the input dtype: each chunk rounded once on store
    for i, (x, y) in enumerate(zip(ac, bc)):
        result[:, i * CHUNK:(i + 1) * CHUNK] = ca * x + cb * y
    return result.reshape(v0.shape)


def merge_slerp(task: "TensorTask", inputs: "TensorInputs", pool: "Executor | None" = None) -> "torch.Tensor":
    return slerp(task.shared["t"], inputs.base(), inputs.model(0))


# --- nuslerp ---------------------------------------------------------------------------------


def nuslerp_pair(t: float, v0: "torch.Tensor", v1: "torch.Tensor", row_wise: bool,
                 flatten: bool) -> "torch.Tensor":
    """slerp in the inputs' dtype, over the whole tensor (`flatten`), else per vector along
    the last dimension (`row_wise`: along the first, by transposing it last)."""
    shape = v0.shape
    transposed = not flatten and row_wise
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif transposed:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    unit = lambda x: x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)  # noqa: E731
    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if transposed:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def merge_nuslerp(task: "TensorTask", inputs: "TensorInputs", pool: "Executor | None" = None) -> "torch.Tensor":
    """The two models' weights give t = w1 / (w0 + w1) (0.5 when they cancel); with a base,
    their task vectors are interpolated and added to it."""
    w0, w1 = (p["weight"] for p in task.params)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    x0, x1 = inputs.model(0), inputs.model(1)
    flags = task.shared["nuslerp_row_wise"], task.shared["nuslerp_flatten"]
    if task.base is None:
        return nuslerp_pair(t, x0, x1, *flags)
    base = inputs.base()
    return base + nuslerp_pair(t, x0 - base, x1 - base, *flags)


# --- multislerp ------------------------------------------------------------------------------


def multislerp(xs: "torch.Tensor", weights: Sequence[float], normalize: bool, eps: float,
               tensor: str) -> "torch.Tensor":
    """The weighted spherical mean of the rows of xs `(n, *shape)`, scaled to their weighted
    mean norm, in xs' dtype (one step along the tangent space from the weighted mean)."""
    n = xs.shape[0]
    flat = xs.view(n, -1)  # (n, numel)
    w = torch.tensor(list(weights), dtype=xs.dtype)  # rounded to the dtype: 0.3 in bf16
    if normalize:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)  # (n, 1)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if n != 2:
            raise RecipeError(
                f"tensor {tensor}: the weighted sum of the multislerp inputs is zero (antipodal "
                "vectors whose weights cancel); mergekit refuses it too. Change the weights")
        return (xs[0] * w[0] + xs[1] * w[1]).view(xs.shape[1:])
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * w.view(-1, 1)).sum(0)
    step_norm = torch.norm(step) + eps
    result = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    result = result * (norms.squeeze(-1) * w).sum()
    return result.view(xs.shape[1:])


def merge_multislerp(task: "TensorTask", inputs: "TensorInputs", pool: "Executor | None" = None) -> "torch.Tensor":
    n = len(task.params)
    if n == 1:
        return inputs.model(0)  # mergekit returns a lone model unchanged, base or not
    xs = torch.stack([inputs.model(i) for i in range(n)], 0)
    base = inputs.base() if task.base is not None else None
    if base is not None:
        xs -= base
    result = multislerp(xs, [p["weight"] for p in task.params], task.shared["normalize_weights"],
                        task.shared["eps"], task.name)
    return result + base if base is not None else result


# --- the Karcher mean ------------------------------------------------------------------------


def karcher(xs: Sequence["torch.Tensor"], max_iter: int, tol: float) -> "torch.Tensor":
    """The Riemannian (Karcher) mean of the inputs' directions, equally weighted, by fixed-point
    iteration, scaled to their mean norm; in the inputs' dtype (norms in float32)."""
    if len(xs) == 1:
        return xs[0]
    work = _work_dtype(xs[0])
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [torch.linalg.vector_norm(x.to(work)) for x in xs]
    units = [torch.zeros_like(x) if n.item() == 0 else (x / n).to(x.dtype) for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in xs)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    vecs = [units[i] for i in valid]
    mean = torch.zeros_like(vecs[0])
    for a, u in zip(weights, vecs):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(work))
    mean = vecs[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, vecs):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(work))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(work))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms))  # every input's norm, zero ones too
    return scale * mean


def merge_karcher(task: "TensorTask", inputs: "TensorInputs", pool: "Executor | None" = None) -> "torch.Tensor":
    xs = [inputs.model(i) for i in range(len(task.params))]
    return karcher(xs, task.shared["max_iter"], task.shared["tol"])


# --- the methods -------------------------------------------------------------------------------

SPECS = (
    MethodSpec(
        name="slerp", pretty_name="SLERP", paper="https://en.wikipedia.org/wiki/Slerp",
        family=__name__, base="required", inputs=(2, 2), random=False, merge=merge_slerp,
        card_base=False,
        parameters=(Parameter("t", "global", REQUIRED,
                              doc="position between the base (0) and the other model (1)"),),
    ),
    MethodSpec(
        name="nuslerp", pretty_name="NuSLERP", paper=None, family=__name__, base="optional",
        non_base=(2, 2), random=False, merge=merge_nuslerp,
        parameters=(
            Parameter("weight", "model", REQUIRED, doc="the two weights give t = w1 / (w0 + w1)"),
            Parameter("nuslerp_row_wise", "global", False, kind="flag",
                      doc="without flattening: slerp each column instead of each row"),
            Parameter("nuslerp_flatten", "global", True, kind="flag",
                      doc="slerp the whole tensor as one vector"),
        ),
    ),
    MethodSpec(
        name="multislerp", pretty_name="Multi-SLERP",
        paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", family=__name__,
        base="optional", non_base=(1, None), random=False, merge=merge_multislerp,
        parameters=(
            Parameter("weight", "model", REQUIRED, doc="the model's weight in the spherical mean"),
            Parameter("normalize_weights", "global", True, kind="flag",
                      doc="divide the weights by their sum"),
            Parameter("eps", "global", 1e-8, doc="below this norm a vector counts as zero"),
        ),
    ),
    MethodSpec(
        name="karcher", pretty_name="Karcher Mean", paper="https://arxiv.org/abs/2603.04972",
        family=__name__, base="ignored", random=False, merge=merge_karcher,
        parameters=(
            Parameter("max_iter", "global", 10, kind="integer", valid=lambda v: v >= 0,
                      allowed="0 or more", doc="iterations of the fixed-point mean"),
            Parameter("tol", "global", 1e-5, doc="convergence tolerance"),
        ),
    ),
)
