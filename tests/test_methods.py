"""The merge methods on hand-computed cases and properties; the streamed form of each
against its step-by-step reference."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from remerge.errors import RecipeError
from remerge.merge.methods import METHODS
from remerge.merge.methods.linear import linear
from remerge.merge.methods.sparsify import (
    dropped_positions, magnitude_mask, outlier_mask, random_mask, rescaled,
)
from remerge.merge.methods.task_arithmetic import Steps, consensus_mask, reference, weight_column
from remerge.merge.releases import RELEASES
from remerge.merge.tensor import METHOD, Source, TensorTask, tensor_seed

NEW, OLD = RELEASES["0.1.5"], RELEASES["0.0.5.1"]
TIES_STEPS, TA_STEPS, DARE_STEPS = Steps("magnitude", True), Steps(None, False), Steps("random", True)
STEPS = {"ties": TIES_STEPS, "task_arithmetic": TA_STEPS, "breadcrumbs": Steps("magnitude_outliers", False),
         "breadcrumbs_ties": Steps("magnitude_outliers", True), "dare_ties": DARE_STEPS}
SHARED = {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0}


def task_arithmetic(steps, base, xs, params, shared, release, seeds):
    return reference(steps, base, xs, params, shared, release, seeds)


class Inputs:
    """Tensors given directly (the role of TensorInputs, which reads them from model files)."""

    def __init__(self, base, xs):
        self.base_tensor, self.xs = base, xs

    def base(self):
        return self.base_tensor.clone()

    def model(self, i):
        return self.xs[i].clone()


def streamed(method_name, base, xs, params, shared, release, seeds, pool=None):
    """The method's own merge function (what merge_tensor runs) on tensors given directly."""
    method = METHODS[method_name]
    src = Source("m", "t", "BF16")
    task = TensorTask(name="t", shape=tuple(base.shape), method=method, release=release, kernel=METHOD,
                      base=src, models=(src,) * len(xs), params=tuple(params), shared=shared,
                      seeds=tuple(seeds), compute_dtype=str(base.dtype).removeprefix("torch."), dtype="BF16")
    return method.merge(task, Inputs(base, xs), pool)


def params(*weights, density=1.0):
    return [{"weight": w, "density": density} for w in weights]


def test_ties_sign_election_and_disjoint_mean_by_hand():
    base = torch.zeros(4)
    x1 = torch.tensor([1.0, -2.0, 3.0, 0.0])
    x2 = torch.tensor([-1.0, -1.0, 2.0, 5.0])
    # sum of deltas [0, -3, 5, 5] -> majority [+, -, +, +]; x1[3] = 0 and x2[0] < 0 drop out
    out = task_arithmetic(TIES_STEPS, base, [x1, x2], params(1, 1), SHARED, NEW, [0, 0])
    assert out.tolist() == [1.0, -1.5, 2.5, 5.0]


def test_ties_without_normalize_sums_the_agreeing_weighted_deltas():
    base = torch.ones(3)
    x1 = torch.tensor([3.0, 1.0, 0.0])  # deltas [2, 0, -1]
    x2 = torch.tensor([2.0, 3.0, -1.0])  # deltas [1, 2, -2]
    shared = {**SHARED, "normalize": False}
    out = task_arithmetic(TIES_STEPS, base, [x1, x2], params(0.5, 2.0), shared, NEW, [0, 0])
    assert out.tolist() == [1 + 1.0 + 2.0, 1 + 4.0, 1 - 0.5 - 4.0]


def test_int8_mask_changes_nothing():
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 50, generator=g).bfloat16()
    deltas[0, :5] = 0
    assert torch.equal(consensus_mask(deltas, True), consensus_mask(deltas, False))


def test_magnitude_keeps_exactly_k_largest():
    d = torch.tensor([0.1, -0.4, 0.3, -0.2])
    assert magnitude_mask(d, 0.5, NEW).tolist() == [0, 1, 1, 0]
    g = torch.Generator().manual_seed(1)
    big = torch.randn(1000, generator=g).bfloat16()  # bf16: many equal magnitudes
    for density in (0.01, 0.37, 0.5, 0.99):
        mask = magnitude_mask(big, density, NEW)
        assert int(mask.float().sum()) == int(density * 1000)
        kept = big.abs().float()[mask.bool()]
        dropped = big.abs().float()[~mask.bool()]
        assert kept.min() >= dropped.max()


def test_magnitude_density_that_keeps_nothing():
    d = torch.ones(10)
    assert magnitude_mask(d, 0.05, NEW).sum() == 1  # 0.1.5 keeps at least one
    with pytest.raises(RecipeError, match="keeps no element"):
        magnitude_mask(d, 0.05, OLD)  # mergekit 0.0.5.1 asserts


def test_breadcrumbs_band_by_hand():
    d = torch.arange(1, 11, dtype=torch.float32) / 10  # 0.1 .. 1.0
    # 10 elements, density 0.5 -> 5 kept, gamma 0.1 -> the largest 1 dropped, 4 smallest dropped
    for version in (NEW, OLD):
        assert outlier_mask(d, 0.5, 0.1, version).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 0]
    # gamma 0 keeps the top 5 in 0.1.5; 0.0.5.1's slice [n_bot:-0] keeps nothing
    assert outlier_mask(d, 0.5, 0.0, NEW).tolist() == [0] * 5 + [1] * 5
    assert outlier_mask(d, 0.5, 0.0, OLD).sum() == 0


def test_weights_round_to_the_compute_dtype():
    assert weight_column([0.3], torch.bfloat16, 1).item() == 0.30078125
    assert weight_column([0.3, 0.7], torch.float32, 2).shape == (2, 1, 1)


def test_linear_by_hand_and_per_version():
    a, b = torch.tensor([2.0, 4.0]), torch.tensor([4.0, 8.0])
    for version in (NEW, OLD):
        assert linear([a, b], [1.0, 3.0], True, version).tolist() == [3.5, 7.0]
        assert linear([a, b], [1.0, 3.0], False, version).tolist() == [14.0, 28.0]


def test_linear_versions_differ_in_bf16():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4000, generator=g).bfloat16() for _ in range(3)]
    new = linear(xs, [0.3, 0.3, 0.4], True, NEW)
    old = linear(xs, [0.3, 0.3, 0.4], True, OLD)
    assert new.dtype == old.dtype == torch.bfloat16
    assert not torch.equal(new, old)  # 0.1.5 accumulates in float32, 0.0.5.1 in bf16


def test_lambda_scales_the_merged_delta():
    base, x = torch.zeros(2), torch.tensor([2.0, -4.0])
    out = task_arithmetic(TA_STEPS, base, [x], params(1.0), {**SHARED, "normalize": False, "lambda": 0.5},
                          NEW, [0])
    assert out.tolist() == [1.0, -2.0]


def test_rescale_keeps_the_l1_norm():
    d = torch.tensor([1.0, -2.0, 3.0, -4.0])
    mask = torch.tensor([0.0, 1.0, 0.0, 1.0])
    for version in (NEW, OLD):
        out = rescaled(d, mask, version)
        assert out.abs().sum().item() == pytest.approx(10.0)
        assert out.tolist()[0] == 0.0


def test_dare_is_seeded_per_tensor_and_model():
    d = torch.ones(10_000)
    a = random_mask(d, 0.3, tensor_seed(0, "w", 0))
    assert torch.equal(a, random_mask(d, 0.3, tensor_seed(0, "w", 0)))
    assert not torch.equal(a, random_mask(d, 0.3, tensor_seed(0, "w", 1)))
    assert not torch.equal(a, random_mask(d, 0.3, tensor_seed(1, "w", 0)))
    assert 0.27 < a.mean().item() < 0.33


def test_dare_ties_merge_is_deterministic():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, generator=g).bfloat16()
    xs = [base + 0.1 * torch.randn(64, generator=g).bfloat16() for _ in range(2)]
    shared = {**SHARED, "normalize": False, "rescale": True}
    run = lambda: task_arithmetic(DARE_STEPS, base, xs, params(0.5, 0.5, density=0.4), shared, NEW,  # noqa: E731
                                  [tensor_seed(7, "t", i) for i in range(2)])
    assert torch.equal(run(), run())


def tricky(seed: int, n: int, dtype, shape=(40, 30)):
    """A base and n inputs with exact zeros, -0, equal magnitudes and mixed signs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    base.view(-1)[:7] = 0.0
    base.view(-1)[7:9] = -0.0
    xs = []
    for i in range(n):
        step = torch.randint(-3, 4, shape, generator=g).to(torch.float32) * 2.0**-7  # many ties
        x = (base.float() + step).to(dtype)
        x.view(-1)[i * 5 : i * 5 + 5] = base.view(-1)[i * 5 : i * 5 + 5]  # zero deltas
        x.view(-1)[7] = -0.0
        xs.append(x)
    return base, xs


@pytest.mark.parametrize("method_name", ["ties", "task_arithmetic", "breadcrumbs", "breadcrumbs_ties", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_streamed_equals_the_reference_bit_for_bit(method_name, dtype, n):
    for case, (weights, density, normalize, lam, rescale) in enumerate([
        ([1.0] * n, 1.0, True, 1.0, False),
        ([0.3, 0.7, 1.0][:n], 0.5, False, 1.0, False),
        ([1.0, 0.5, 0.25][:n], 0.37, True, 0.8, True),
        ([0.0, 1.0, 2.0][:n], 0.9, True, 1.0, False),
    ]):
        base, xs = tricky(case + 10 * n, n, dtype)
        params = [{"weight": w, "density": density, "gamma": 0.05} for w in weights]
        shared = {"int8_mask": True, "normalize": normalize, "rescale": rescale, "lambda": lam}
        seeds = [tensor_seed(case, "t", i) for i in range(n)]
        for version in (NEW, OLD):
            ref = task_arithmetic(STEPS[method_name], base, xs, params, shared, version, seeds)
            with ThreadPoolExecutor(2) as pool:
                fast = streamed(method_name, base, xs, params, shared, version, seeds, pool)
            assert torch.equal(ref.view(-1).view(torch.uint8), fast.view(-1).view(torch.uint8)), (case, version)


def test_plain_difference_falls_back_on_nan():
    base = torch.zeros(4, dtype=torch.bfloat16)
    x = torch.tensor([1.0, float("nan"), -2.0, 0.0], dtype=torch.bfloat16)
    params, shared = [{"weight": 1.0, "density": 1.0}], {**SHARED, "int8_mask": True}
    ref = task_arithmetic(TIES_STEPS, base, [x], params, shared, NEW, [0])
    fast = streamed("ties", base, [x], params, shared, NEW, [0])
    assert torch.equal(ref.view(torch.int16), fast.view(torch.int16))  # NaN dropped by sign election


def test_native_kernel_is_built_here():
    from remerge.merge.kernels import native
    assert native.library() is not None, "no C compiler? the suite should exercise the kernel"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_kernel_keeps_exactly_what_torchs_sort_keeps(dtype):
    from remerge.merge.kernels import native

    g = torch.Generator().manual_seed(7)
    for n in [1, 2, 16, 17, 33, 100, 1000, 4099, 70_001, 1_000_003]:
        for kind in range(4):
            x = torch.randn(n, generator=g) * 0.01
            if kind == 1:
                x = torch.randint(-3, 4, (n,), generator=g).float()  # few distinct magnitudes
            if kind == 2:
                x[torch.rand(n, generator=g) < 0.4] = 0
            if kind == 3 and n > 10:
                x[:3] = float("nan")
                x[3] = float("inf")
            d = x.to(dtype)
            for band in [(True, 0, max(1, n // 3)), (True, 0, n), (False, n // 5, n // 5 + n // 2),
                         (False, n // 2, n // 2), (False, 0, n - n // 7)]:
                expected = d.clone()
                expected.view(-1)[dropped_positions(d, band)] = 0
                ours = d.clone()
                assert native.zero_outside(ours, *band)
                assert torch.equal(ours.view(-1).view(torch.uint8 if dtype == torch.float32 else torch.uint8),
                                   expected.view(-1).view(torch.uint8)), (n, kind, band)


def test_config_readme_lists_every_method_as_the_registry_declares_it():
    from pathlib import Path

    from remerge.merge.methods import methods_markdown

    readme = (Path(__file__).resolve().parents[1] / "config" / "README.md").read_text()
    section = readme.partition("<!-- methods:")[2]
    table = section.partition("-->\n")[2].partition("<!-- /methods -->")[0]
    assert table == methods_markdown(), "regenerate with `python -m remerge.merge.methods`"


def test_multislerp_refuses_a_zero_weighted_sum_of_three_and_lerps_two():
    from remerge.merge.methods.spherical import multislerp

    a = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    two = multislerp(torch.stack([a, -a]), [1.0, 1.0], True, 1e-8, "t")
    assert torch.equal(two, torch.zeros_like(a))  # antipodal pair, equal weights: the lerp is 0
    with pytest.raises(RecipeError, match="tensor model.norm.weight: the weighted sum of the multislerp inputs is zero"):
        multislerp(torch.stack([a, -a, torch.zeros_like(a)]), [1.0, 1.0, 1.0], True, 1e-8, "model.norm.weight")


def test_slerp_ends_are_the_inputs_and_parallel_inputs_interpolate_linearly():
    from remerge.merge.methods.spherical import slerp

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 30, generator=g).bfloat16(), torch.randn(40, 30, generator=g).bfloat16()
    assert torch.equal(slerp(0.0, a, b), a) and torch.equal(slerp(1.0, a, b), b)
    assert torch.equal(slerp(0.25, a, -a), (0.5 * a.float()).bfloat16())  # antipodal: lerp, (1 - 2t) a


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_fused_combine_is_torchs_combine_bit_for_bit(n):
    from remerge.merge.methods import task_arithmetic as ta

    assert ta.combine_kernel() is not None, "the fused kernel should be built and verified here"
    g = torch.Generator().manual_seed(n)
    size = 3000
    base = (torch.randn(size, generator=g) * 0.02).bfloat16()
    deltas = (torch.randn(n, size, generator=g) * 1e-3).bfloat16()
    deltas[torch.rand(deltas.shape, generator=g) < 0.4] = 0
    deltas[:, :500] = deltas[:, :500].sign() * 1e-3  # equal magnitudes: cancellations, ties
    weights = (torch.rand(n, generator=g) * 2 - 0.5).tolist()
    for steps in (ta.Steps("magnitude", True), ta.Steps(None, False)):
        for ws in (weights, [1.0] * n, [0.0] * n):
            for normalize, lam in ((True, 1.0), (False, 0.7), (True, 1 / 3)):
                shared = {"int8_mask": True, "normalize": normalize, "lambda": lam}
                expected = ta.combine(steps, base, deltas.clone(), ws, shared)
                fused = ta.fused_combine(steps, base, deltas, ws, shared)
                assert torch.equal(fused.view(torch.int16), expected.view(torch.int16)), (steps, ws, normalize, lam)


def test_fused_combine_leaves_non_finite_values_to_torch():
    from remerge.merge.methods import task_arithmetic as ta

    base = torch.zeros(8, dtype=torch.bfloat16)
    shared = {"int8_mask": False, "normalize": True, "lambda": 1.0}
    for bad in (float("nan"), float("inf")):
        deltas = torch.full((2, 8), 1e-3, dtype=torch.bfloat16)
        deltas[1, 3] = bad
        assert ta.fused_combine(ta.Steps("magnitude", True), base, deltas, [1.0, 1.0], shared) is None
    huge = torch.full((2, 8), 3e38, dtype=torch.bfloat16)  # the float32 sum overflows
    assert ta.fused_combine(ta.Steps(None, False), base, huge, [1.0, 1.0], shared) is None
    assert ta.fused_combine(ta.Steps(None, False), base.float(), huge.float(), [1.0, 1.0], shared) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_ranks_are_torchs_double_argsort(dtype):
    from remerge.merge.kernels import native

    g = torch.Generator().manual_seed(3)
    for shape in [(1, 2), (3, 17), (50, 100), (4, 5000)]:
        for kind in range(3):
            x = torch.randn(shape, generator=g) * 0.01
            if kind == 1:
                x = torch.randint(-3, 4, shape, generator=g).float()  # few distinct magnitudes
            if kind == 2:
                x[torch.rand(shape, generator=g) < 0.4] = 0
            d = x.to(dtype)
            expected = torch.argsort(d.abs(), dim=1, descending=False).argsort(dim=1)
            assert torch.equal(native.rank_rows(d, descending=False), expected.int()), (shape, kind)
    d = (torch.randn(200, 1000, generator=g) * 0.01).to(dtype)  # rows split in two on a pool
    with ThreadPoolExecutor(2) as pool:
        assert torch.equal(native.rank_rows(d, False, pool), torch.argsort(d.abs(), dim=1).argsort(dim=1).int())


@pytest.mark.parametrize("version", ["0.0.5.1", "0.1.4", "0.1.5"])
def test_compiled_dare_and_della_draw_what_torch_draws(version):
    from remerge.merge.methods import sparsify as sp

    assert sp.dare_kernel() is not None, "the DARE kernel should be built and verified here"
    release = RELEASES[version]
    for seed in (0, 5, 2**33 + 1):
        for shape in ((1000,), (300, 77)):
            d = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1e-3).bfloat16()
            d.view(-1)[::9] = 0
            for kind, params in (("random", {"density": 0.3}), ("della_magprune", {"density": 0.5, "epsilon": 0.2})):
                for rescale in (True, False):
                    expected = sp.sparsify(kind, d, params, rescale, release, seed)
                    ours = d.clone()
                    sp.sparsify_(kind, ours, params, rescale, release, seed)
                    assert torch.equal(ours.view(torch.int16), expected.view(torch.int16)), (kind, seed, shape, rescale)
    ours = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.bfloat16)
    assert not sp.dare_(ours, 0.5, None, 0, release)  # left to torch, unchanged
    assert ours[0] == 1 and ours[2] == 2
