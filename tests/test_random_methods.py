"""Random methods (DARE, DELLA, arcee_fusion on large tensors): each tensor's result depends
only on the seed, the tensor's name and the recipe, never on threads, shard jobs or their
order; and the statistics are the recipe's (kept fraction against density, the rescale).

mergekit draws from one global generator in tensor order, so its bytes cannot be reproduced
once the work is split; these tests check what can be: determinism and the distribution."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from remerge.cli import main
from tinymodels import finetune, random_tensors, write_model

RECIPE = """\
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.7}}
merge_method: {method}
base_model: {base}
dtype: bfloat16
"""
RANDOM_METHODS = ["dare_ties", "dare_linear", "della", "della_linear"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("random")
    base = random_tensors(0)
    write_model(root / "base", base, shards=2)
    write_model(root / "a", finetune(base, 1))
    write_model(root / "b", finetune(base, 2))
    return root


def merge(root: Path, text: str, out: Path, *args: str) -> dict[str, bytes]:
    (root / "recipe.yml").write_text(text)
    assert main(["merge", str(root / "recipe.yml"), str(out), *args]) == 0
    return {f.name: f.read_bytes() for f in sorted(out.glob("model*"))}


def recipe(root: Path, method: str) -> str:
    return RECIPE.format(a=root / "a", b=root / "b", base=root / "base", method=method)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_same_bytes_whatever_the_threads_and_shard_jobs_and_another_seed_differs(models, tmp_path, method):
    text = recipe(models, method)
    shards = ["--out-shard-size", "4K"]
    one = merge(models, text, tmp_path / "t1", "--random-seed", "7", "--threads", "1", *shards)
    eight = merge(models, text, tmp_path / "t8", "--random-seed", "7", "--threads", "8", *shards)
    assert len([n for n in one if n.endswith(".safetensors")]) > 1 and one == eight
    # the workflow's route: a plan, then one job per shard, in reverse order
    by_hand = tmp_path / "jobs"
    (models / "recipe.yml").write_text(text)
    plan = tmp_path / "plan.json"
    assert main(["plan", str(models / "recipe.yml"), str(plan), *shards]) == 0
    for name in sorted((n for n in one if n.startswith("model-")), reverse=True):
        assert main(["merge-shard", str(plan), str(models / "recipe.yml"), str(by_hand / name),
                     "--random-seed", "7"]) == 0
    assert main(["assemble", str(plan), str(models / "recipe.yml"), str(by_hand)]) == 0
    assert {f.name: f.read_bytes() for f in sorted(by_hand.glob("model*"))} == one
    other = merge(models, text, tmp_path / "s8", "--random-seed", "8", *shards)
    assert other.keys() == one.keys() and other != one


# --- statistics on one large tensor --------------------------------------------------------

ROWS, COLS = 256, 512
N = ROWS * COLS


def one_tensor_models(root: Path, dtype=torch.float32, shape=(ROWS, COLS)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g).to(dtype)
    delta = (0.01 * torch.randn(shape, generator=g)).to(dtype)
    delta[delta == 0] = 0.01  # every entry moves
    for name, w in (("base", base), ("ft", (base.float() + delta.float()).to(dtype))):
        write_model(root / name, {"model.embed_tokens.weight": w.contiguous()})
    ft = load_file(root / "ft" / "model.safetensors")["model.embed_tokens.weight"]
    return base, ft


def merged_delta(root: Path, method: str, params: str, *args: str, shared: str = "normalize: false",
                 version: str = "0.1.5") -> tuple[torch.Tensor, torch.Tensor]:
    """(merged - base, ft - base) in float64 for one fine-tune with `params`, in float32."""
    (root / "r.yml").write_text(
        f"models:\n  - model: {root / 'ft'}\n    parameters: {{{params}}}\nmerge_method: {method}\n"
        f"base_model: {root / 'base'}\nparameters: {{{shared}}}\ndtype: float32\n")
    out = root / f"out-{method}-{version}-{len(list(root.glob('out-*')))}"
    assert main(["merge", str(root / "r.yml"), str(out), "--mergekit-version", version, *args]) == 0
    merged = load_file(next(out.glob("*.safetensors")))["model.embed_tokens.weight"].double()
    base = load_file(root / "base" / "model.safetensors")["model.embed_tokens.weight"].double()
    ft = load_file(root / "ft" / "model.safetensors")["model.embed_tokens.weight"].double()
    return merged - base, ft - base


def within_binomial(kept: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(kept / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_dare_keeps_density_and_rescales_to_the_l1_norm(tmp_path):
    one_tensor_models(tmp_path)
    out, delta = merged_delta(tmp_path, "dare_linear", "weight: 1.0, density: 0.3")
    kept = out != 0
    assert within_binomial(int(kept.sum()), N, 0.3)
    # mergekit 0.1.5 rescales by the ratio of L1 norms: the merged delta keeps the L1 norm
    assert float(out.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)
    factor = float(delta.abs().sum() / delta[kept].abs().sum())  # one factor for the tensor
    assert torch.allclose(out[kept], delta[kept] * factor, rtol=1e-4, atol=1e-6)
    assert factor == pytest.approx(N / int(kept.sum()), rel=0.02)


def test_dare_before_mergekit_01_rescales_by_one_over_density(tmp_path):
    one_tensor_models(tmp_path)
    out, delta = merged_delta(tmp_path, "dare_linear", "weight: 1.0, density: 0.3", version="0.0.5.1")
    kept = out != 0
    assert within_binomial(int(kept.sum()), N, 0.3)
    assert torch.allclose(out[kept], delta[kept] / 0.3, rtol=1e-4, atol=1e-6)


def test_dare_without_rescale_keeps_the_values(tmp_path):
    one_tensor_models(tmp_path)
    out, delta = merged_delta(tmp_path, "dare_ties", "weight: 1.0, density: 0.6",
                              shared="normalize: false, rescale: false")
    kept = out != 0
    assert within_binomial(int(kept.sum()), N, 0.6)
    assert torch.allclose(out[kept], delta[kept], rtol=1e-5, atol=1e-7)


def test_della_keeps_density_on_average_and_favours_large_entries(tmp_path):
    one_tensor_models(tmp_path)
    density, epsilon = 0.4, 0.2
    out, delta = merged_delta(tmp_path, "della_linear", f"weight: 1.0, density: {density}, epsilon: {epsilon}")
    kept = out != 0
    assert within_binomial(int(kept.sum()), N, density)  # the mean of density -/+ epsilon
    # keep probability is linear in the magnitude rank within each row: the top quarter of a
    # row is kept with about density + 0.75 epsilon, the bottom quarter density - 0.75 epsilon
    order = delta.abs().argsort(dim=1)
    quarter = COLS // 4
    low = torch.gather(kept, 1, order[:, :quarter]).double().mean()
    high = torch.gather(kept, 1, order[:, -quarter:]).double().mean()
    n = ROWS * quarter
    assert within_binomial(int(high * n), n, density + 0.75 * epsilon, sigmas=6)
    assert within_binomial(int(low * n), n, density - 0.75 * epsilon, sigmas=6)


def test_della_refuses_an_epsilon_that_leaves_zero_one(tmp_path, capsys):
    one_tensor_models(tmp_path)
    (tmp_path / "r.yml").write_text(
        f"models:\n  - model: {tmp_path / 'ft'}\n    parameters: {{weight: 1, density: 0.9, epsilon: 0.15}}\n"
        f"merge_method: della\nbase_model: {tmp_path / 'base'}\n")
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tensor model.embed_tokens.weight of model" in err and "density 0.9 +/- epsilon 0.15" in err


def test_arcee_fusion_samples_large_tensors_with_the_seed(tmp_path):
    """Quantiles of a tensor over 10^6 elements come from 10^6 sampled entries."""
    one_tensor_models(tmp_path, dtype=torch.float32, shape=(1024, 1000))

    def run(seed: str) -> torch.Tensor:
        (tmp_path / "r.yml").write_text(
            f"models:\n  - model: {tmp_path / 'ft'}\nmerge_method: arcee_fusion\n"
            f"base_model: {tmp_path / 'base'}\ndtype: float32\n")
        out = tmp_path / f"out{seed}-{len(list(tmp_path.glob('out*')))}"
        assert main(["merge", str(tmp_path / "r.yml"), str(out), "--random-seed", seed]) == 0
        return load_file(out / "model.safetensors")["model.embed_tokens.weight"]

    first = run("1")
    assert torch.equal(first, run("1"))
    assert not torch.equal(first, run("2"))
