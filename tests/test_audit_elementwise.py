"""The element-by-element audit of random merges (remerge/provenance/elementwise.py).

The published merges are the real mergekit's, run with --random-seed 42 (tests/parity/goldens);
the audit is not told the seed. A genuine merge must audit as consistent with every element
matched; the same bytes with a recipe that states another density, weight, parent or base
must not. The parity models are tiny (tensors of 8 to 400 elements): a tensor of a few dozen
elements cannot show a wrong density at the audit's threshold (see the module docstring), so
the density cases assert detection on the 400-element embeddings and the pooled test, with a
margin.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from remerge.errors import AuditError
from remerge.io.safetensors import ModelFolder
from remerge.merge.methods.arcee_fusion import arcee_fusion
from remerge.merge.plan import plan_merge
from remerge.merge.recipe import parse_recipe
from remerge.merge.tensor import TensorInputs, merge_tensor, plan_tensor
from remerge.provenance import elementwise as ew

PARITY = Path(__file__).resolve().parent / "parity"
SEEDED = ("dare_ties_seed_bf16", "della_seed_bf16", "della_seed_fp16", "della_linear_seed_fp32")
EMBED = "model.embed_tokens.weight"


def recipe_text(name: str, change=None) -> str:
    data = yaml.safe_load((PARITY / "recipes" / f"{name}.yml").read_text())
    if change:
        change(data)
    return yaml.safe_dump(data, sort_keys=False)


def load(text: str, version: str = "0.1.5"):
    """The recipe with its references (relative to tests/parity) made absolute, its plan and models."""
    recipe = parse_recipe(text, version=version)
    recipe = recipe.with_references({ref: str((PARITY / ref).resolve()) for ref in recipe.inputs})
    plan = plan_merge(recipe, {ref: ref for ref in recipe.inputs})
    return recipe, plan, plan.open_models()


def audit(text: str, golden: str, version: str = "0.1.5"):
    """check_tensor on every tensor of a golden, then summarize: (summary, checks)."""
    recipe, plan, models = load(text, version)
    published = ModelFolder(PARITY / "goldens" / version / golden)
    checks = []
    for tensor in plan.tensors.values():
        task = plan_tensor(recipe, tensor)
        checks.append(ew.check_tensor(task, TensorInputs(task, models), published.view(task.name)))
    return ew.summarize(checks), checks


def ref(model: str) -> str:
    return str((PARITY / model).resolve())


def set_param(index: int, key: str, value):
    def change(data):
        data["models"][index]["parameters"][key] = value
    return change


def set_model(index: int, model: str):
    def change(data):
        data["models"][index]["model"] = model
    return change


def set_base(model: str):
    def change(data):
        data["base_model"] = model
    return change


def tensor_p_values(checks, model: str) -> dict[str, float]:
    return {c["name"]: m["p_value"] for c in checks for m in c["models"]
            if m["model"] == model and m.get("tested")}


# --- genuine merges ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def genuine():
    return {name: audit(recipe_text(name), name) for name in SEEDED}


@pytest.mark.parametrize("name", SEEDED)
def test_mergekit_seeded_merges_audit_as_consistent(genuine, name):
    summary, checks = genuine[name]
    assert summary["verdict"] == ew.CONSISTENT, summary["problems"]
    assert summary["tensors"] == 30 and all(c["unmatched"] == 0 for c in checks)
    per_test = summary["threshold"]["per_test"]
    for c in checks:
        for m in c["models"]:
            assert m["drawn"]
            if m["tested"]:
                assert m["p_value"] >= per_test
            if "l1_allowed" in m:  # the factor used is one the revealed mask's L1 norms allow
                assert m["l1_allowed"][0] <= m["scale"] <= m["l1_allowed"][1]
    assert len(summary["models"]) == 2
    for pooled in summary["models"].values():
        assert pooled["tested"] > 1000 and pooled["p_value"] > 1e-3


def test_the_statuses_are_tested_without_bias(genuine):
    """Pooled over the four merges, the kept shares sit within 3 sd of the recipe's."""
    kept = expected = var = 0.0
    for summary, checks in genuine.values():
        for c in checks:
            for m in c["models"]:
                if m["tested"]:
                    kept, expected, var = kept + m["kept"], expected + m["expected"], var + m["sd"] ** 2
    assert abs(kept - expected) < 3 * var ** 0.5, (kept, expected, var ** 0.5)


def test_mergekit_0051_dare_rescales_by_the_inverse_density():
    """0.0.5.1's DARE divides kept entries by the density (nothing to estimate)."""
    summary, checks = audit(recipe_text("dare_ties_seed_bf16"), "dare_ties_seed_bf16", "0.0.5.1")
    assert summary["verdict"] == ew.CONSISTENT, summary["problems"]
    m = checks[0]["models"]
    assert [x["rescale"] for x in m] == ["inverse_density"] * 2
    assert [x["scale"] for x in m] == [2.0, float(torch.tensor(1 / 0.7, dtype=torch.bfloat16))]


# (recipe, --random-seed): among them draws whose tiny tensors need the search's repairs
OWN_MERGES = [("dare_ties_seed_bf16", 7), ("della_seed_bf16", 5), ("della_seed_fp16", 3),
              ("della_seed_fp16", 14), ("della_linear_seed_fp32", 1)]


@pytest.mark.parametrize("name, seed", OWN_MERGES)
def test_remerge_own_seeded_merge_audits_as_consistent(name, seed):
    """A merge whose draws differ from mergekit's (remerge seeds each tensor) is as genuine."""
    recipe, plan, models = load(recipe_text(name))
    checks = []
    for tensor in plan.tensors.values():
        task = plan_tensor(recipe, tensor, seed=seed)
        raw = merge_tensor(task, models)
        signed = {2: "int16", 4: "int32"}[raw.itemsize]
        published = torch.from_numpy(raw.view(signed).copy()).view(ew.torch_dtype(task.dtype)).reshape(task.shape)
        checks.append(ew.check_tensor(task, TensorInputs(task, models), published))
    summary = ew.summarize(checks)
    assert summary["verdict"] == ew.CONSISTENT, summary["problems"]
    assert all(c["unmatched"] == 0 for c in checks)


def test_one_altered_element_is_named():
    recipe, plan, models = load(recipe_text("dare_ties_seed_bf16"))
    task = plan_tensor(recipe, plan.tensors[EMBED])
    published = ModelFolder(PARITY / "goldens/0.1.5/dare_ties_seed_bf16").view(EMBED).clone()
    published[3, 5] += 0.25  # not base plus any subset of the rescaled task vectors
    check = ew.check_tensor(task, TensorInputs(task, models), published)
    assert check["unmatched"] == 1
    assert check["problems"] == [f"tensor {EMBED}: 1 of 400 elements match no allowed value"]
    assert ew.summarize([check])["verdict"] == ew.INCONSISTENT


# --- the same bytes, another recipe ------------------------------------------------------------

WRONG_DENSITY = [
    # (recipe, model index, stated density); every one was drawn at 0.5, 0.7 or 0.4..0.6
    ("dare_ties_seed_bf16", 0, 0.9),
    ("dare_ties_seed_bf16", 0, 0.7),
    ("della_seed_bf16", 0, 0.8),
    ("della_linear_seed_fp32", 1, 0.3),
]


@pytest.mark.parametrize("name, index, density", WRONG_DENSITY)
def test_a_wrong_density_is_detected(name, index, density):
    summary, checks = audit(recipe_text(name, set_param(index, "density", density)), name)
    assert summary["verdict"] == ew.INCONSISTENT
    assert all(c["unmatched"] == 0 for c in checks)  # the values fit: the kept share does not
    model = ref(yaml.safe_load(recipe_text(name))["models"][index]["model"])
    per_test = summary["threshold"]["per_test"]
    # detected on the 400-element embeddings with a margin of 10x at least (0.7 for 0.5: 3e-10
    # against 1.7e-8), and pooled by far
    assert tensor_p_values(checks, model)[EMBED] < per_test / 10
    assert summary["models"][model]["p_value"] < per_test * 1e-20
    named = [p for p in summary["problems"] if p.startswith(f"tensor {EMBED}, model {model}: kept ")]
    assert named and f"where density {density:g}" in named[0] and "allows" in named[0] and "sd" in named[0]
    assert any(p.startswith(f"model {model}, all tensors: kept ") for p in summary["problems"])


WRONG_WEIGHT = [
    ("dare_ties_seed_bf16", 0, 0.3),  # w * r is all a lone model shows: the L1 check catches it
    ("dare_ties_seed_bf16", 0, 0.57),
    ("della_seed_bf16", 0, 0.3),  # normalized: the weight cancels alone, not in a mix
    ("della_linear_seed_fp32", 0, 0.5),
]


@pytest.mark.parametrize("name, index, weight", WRONG_WEIGHT)
def test_a_wrong_weight_is_detected(name, index, weight):
    summary, checks = audit(recipe_text(name, set_param(index, "weight", weight)), name)
    assert summary["verdict"] == ew.INCONSISTENT
    assert any(p.startswith(f"tensor {EMBED}") for p in summary["problems"])
    if weight == 0.3 and name.startswith("dare"):  # the values fit with a doubled factor; the L1 norms do not
        embed = next(c for c in checks if c["name"] == EMBED)
        assert embed["unmatched"] == 0
        assert any(p.startswith(f"tensor {EMBED}, model {ref('./models/ft_a')}: the published values scale")
                   and "L1-norm ratio" in p for p in summary["problems"])


@pytest.mark.parametrize("name, change", [
    ("dare_ties_seed_bf16", set_model(1, "./models/ft_c")),
    ("della_seed_bf16", set_model(1, "./models/ft_c")),
    ("dare_ties_seed_bf16", set_base("./models/near")),
    ("della_linear_seed_fp32", set_base("./models/near")),
], ids=["dare-ft_c", "della-ft_c", "dare-near-base", "della_linear-near-base"])
def test_another_parent_is_detected(name, change):
    summary, checks = audit(recipe_text(name, change), name)
    assert summary["verdict"] == ew.INCONSISTENT
    embed = next(c for c in checks if c["name"] == EMBED)
    assert embed["unmatched"] > 20
    assert f"tensor {EMBED}: {embed['unmatched']:,} of 400 elements match no allowed value" in summary["problems"]


def test_a_deterministic_ties_merge_is_not_a_dare_merge():
    """TIES keeps the largest entries (no rescale): checked as dare_ties at density 0.5, its
    kept shares and factors do not fit."""
    def as_dare(data):
        data["merge_method"] = "dare_ties"
        for m in data["models"]:
            m["parameters"]["density"] = 0.5
    summary, checks = audit(recipe_text("ties_d05_two_models", as_dare), "ties_d05_two_models")
    assert summary["verdict"] == ew.INCONSISTENT
    ft_a = ref("./models/ft_a")
    assert summary["models"][ft_a]["kept_share"] > 0.7  # the top half of |delta| among nonzero entries
    assert any(p.startswith(f"tensor {EMBED}, model {ft_a}: kept ") for p in summary["problems"])


# --- arcee_fusion ----------------------------------------------------------------------------

ARCEE = ("arcee_fusion_bf16", "arcee_fusion_copy_fp16", "arcee_fusion_fp32", "arcee_fusion_out_dtype_bf16")


@pytest.mark.parametrize("name", ARCEE)
def test_arcee_fusion_small_tensors_are_compared_exactly(name):
    summary, checks = audit(recipe_text(name), name)
    assert summary["verdict"] == ew.CONSISTENT, summary["problems"]
    assert all(c["exact"] and c["unmatched"] == 0 for c in checks)


def test_arcee_fusion_small_tensor_altered():
    recipe, plan, models = load(recipe_text("arcee_fusion_bf16"))
    task = plan_tensor(recipe, plan.tensors[EMBED])
    published = ModelFolder(PARITY / "goldens/0.1.5/arcee_fusion_bf16").view(EMBED).clone()
    published[0, 0] += 1
    check = ew.check_tensor(task, TensorInputs(task, models), published)
    assert check["problems"] == [f"tensor {EMBED}: 1 of 400 elements differ from the recipe's "
                                 "(deterministic at this size)"]


class Inputs:
    """TensorInputs' interface over tensors in memory."""

    def __init__(self, base, x):
        self._base, self._x = base, x

    def base(self):
        return self._base

    def model(self, i):
        return self._x


@pytest.fixture(scope="module")
def large_fusion():
    """A bf16 tensor over 10^6 elements (sampled quantiles), its task and remerge's merge."""
    recipe, plan, _ = load(recipe_text("arcee_fusion_bf16"))
    shape = (1000, 1001)
    task = dataclasses.replace(plan_tensor(recipe, plan.tensors[EMBED]), name="big.weight", shape=shape)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    x = (base.float() + torch.randn(shape, generator=g) * torch.rand((1000, 1), generator=g) * 0.5).to(torch.bfloat16)
    return task, Inputs(base, x), arcee_fusion(base, x, 12345)


def test_arcee_fusion_with_sampled_quantiles(large_fusion):
    task, inputs, published = large_fusion
    assert ew.needs_check(task)
    check = ew.check_tensor(task, inputs, published)
    assert check["problems"] == [] and not check["exact"] and check["unmatched"] == 0
    low, high = check["threshold_range"]
    assert check["cut"][0] < high and check["cut"][1] >= low
    assert ew.summarize([check])["verdict"] == ew.CONSISTENT


def test_arcee_fusion_with_another_threshold(large_fusion):
    task, inputs, _ = large_fusion
    base, x = inputs.base(), inputs.model(0)
    importance = ew._importance(base, x)
    cut = importance.reshape(-1).sort().values[int(0.7 * importance.numel())]  # keeps 30%
    published = base + (x - base) * (importance >= cut).float()
    check = ew.check_tensor(task, inputs, published)
    assert len(check["problems"]) == 1 and "median + 1.5 IQR of a sample of 1,000,000 lies in" in check["problems"][0]


def test_arcee_fusion_keeping_a_less_important_entry(large_fusion):
    task, inputs, genuine = large_fusion
    base = inputs.base()
    importance = ew._importance(base, inputs.model(0)).reshape(-1)
    published = genuine.clone().reshape(-1)
    top = int(importance.float().argmax())
    published[top] = base.reshape(-1)[top].float()  # the most important entry dropped
    check = ew.check_tensor(task, inputs, published.reshape(base.shape))
    assert check["problems"] == ["tensor big.weight: the kept entries are not the most important ones "
                                 "(1 dropped entries matter at least as much as the least important kept one)"]


# --- limits and statistics -------------------------------------------------------------------


def test_more_than_four_models_are_refused():
    recipe, plan, models = load(recipe_text("dare_ties_seed_bf16"))
    task = plan_tensor(recipe, plan.tensors[EMBED])
    task = dataclasses.replace(task, models=task.models * 3, params=task.params * 3, seeds=task.seeds * 3)
    with pytest.raises(AuditError, match="6 merged models; .* handles at most 4"):
        ew.check_tensor(task, TensorInputs(task, models), torch.zeros(task.shape, dtype=torch.bfloat16))


def test_which_methods_and_tensors_are_checked():
    assert all(ew.supports(m) for m in ("dare_ties", "dare_linear", "della", "della_linear", "arcee_fusion"))
    assert not ew.supports("ties") and not ew.supports("linear")
    recipe, plan, _ = load(recipe_text("dare_ties_seed_bf16"))
    assert ew.needs_check(plan_tensor(recipe, plan.tensors[EMBED]))
    recipe, plan, _ = load(recipe_text("della_density1"))  # density 1: nothing drawn, compare bytes
    assert not ew.needs_check(plan_tensor(recipe, plan.tensors[EMBED]))
    recipe, plan, _ = load(recipe_text("arcee_fusion_bf16"))  # 400 elements: exact quantiles
    assert not ew.needs_check(plan_tensor(recipe, plan.tensors[EMBED]))


def test_kept_count_test():
    # binomial, exact: 0 of 10 at 0.5 is 2 * 2^-10
    assert ew.kept_count_test(0, torch.full((10,), 0.5, dtype=torch.float64))["p_value"] == pytest.approx(2 / 1024)
    assert ew.kept_count_test(5, torch.full((10,), 0.5, dtype=torch.float64))["p_value"] == 1.0
    # Poisson-binomial (dynamic programming) agrees with the binomial for equal probabilities
    nearly = torch.full((40,), 0.3, dtype=torch.float64)
    nearly[0] += 1e-12
    for kept in (3, 12, 25):
        exact = ew.kept_count_test(kept, torch.full((40,), 0.3, dtype=torch.float64))
        assert ew.kept_count_test(kept, nearly)["p_value"] == pytest.approx(exact["p_value"], rel=1e-6)
    # beyond EXACT_UP_TO: normal approximation
    many = torch.linspace(0.2, 0.4, 10_000, dtype=torch.float64)
    big = ew.kept_count_test(3000 + 200, many)
    assert big["z"] == pytest.approx(200 / float((many * (1 - many)).sum()) ** 0.5)
    assert big["p_value"] == pytest.approx(ew.two_sided_p((200 - 0.5) / big["sd"]))
    assert ew.two_sided_p(ew.critical_z(1e-8)) == pytest.approx(1e-8)


def test_kept_count_test_margin():
    """Probabilities trusted to +- margin: nothing between the shifted means is unusual, and
    beyond them the p-value is the nearest shifted distribution's."""
    probs = torch.full((1000,), 0.5, dtype=torch.float64)
    assert ew.kept_count_test(509, probs, 0.01)["p_value"] == 1.0
    assert ew.kept_count_test(491, probs, 0.01)["p_value"] == 1.0
    beyond = ew.kept_count_test(600, probs, 0.01)
    assert beyond["p_value"] == pytest.approx(ew.kept_count_test(600, torch.full((1000,), 0.51, dtype=torch.float64))["p_value"])
    assert beyond["p_value"] > ew.kept_count_test(600, probs)["p_value"]
    assert beyond["z"] == pytest.approx(100 / 250 ** 0.5)  # z is reported against the recipe's own share


def test_summarize_threshold_is_bonferroni():
    check = {"name": "t", "problems": [], "models": [
        {"model": "m", "tested": 100, "kept": 50, "expected": 50.0, "sd": 5.0, "p_value": 2e-9,
         "density": 0.5}]}
    summary = ew.summarize([check], alpha=1e-6)
    assert summary["threshold"]["tests"] == 2 and summary["threshold"]["per_test"] == 5e-7
    assert summary["verdict"] == ew.INCONSISTENT
    assert summary["problems"][0].startswith("tensor t, model m: kept 50.0% of 100 testable entries "
                                             "where density 0.5 allows 50.0% ± ")
    check["models"][0]["p_value"] = 1e-6
    assert ew.summarize([check], alpha=1e-6)["verdict"] == ew.CONSISTENT
