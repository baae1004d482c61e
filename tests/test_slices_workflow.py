"""Recipes in the `slices:` form in the workflow (tests/configs/slices.yaml): a passthrough
frankenmerge and a LazyMergekit-style slerp with a grid, each output shard one job."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import ROOT, SNAKEMAKE, jobs_of, snakemake
from remerge.workflow.config import ConfigError, check_config

CONFIG = ROOT / "tests" / "configs" / "slices.yaml"
slow = pytest.mark.slow  # the tests that run the workflow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("wf-slices")
    snakemake(work, "--cores", "2", config=CONFIG, check=True)
    return work


def tensors(folder: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k).view(-1).view(torch.uint8).numpy().tobytes() for k in f.keys()})
    return out


@slow
def test_the_frankenmerge_repeats_a_layer_as_the_recipe_says(run):
    model = run / "results/franken/single/model"
    assert json.loads((model / "config.json").read_text())["num_hidden_layers"] == 3
    out, base, instruct = tensors(model), tensors(run / "results/demo/base"), tensors(run / "results/demo/instruct")
    for name, data in out.items():
        if ".layers.2." in name:  # instruct's layer 1, again
            assert data == instruct[name.replace(".layers.2.", ".layers.1.")], name
        elif ".layers." in name:
            assert data == base[name], name
    assert len(list(model.glob("model-*.safetensors"))) > 1  # several shards, one job each


@slow
def test_the_workflow_equals_remerge_merge_on_the_rendered_recipe(run):
    for merge, point in (("franken", "single"), ("lazy", "t~0.3"), ("lazy", "t~0.7")):
        folder = run / "results" / merge / point / "model"
        recipe = yaml.safe_load((folder / "mergekit_config.yml").read_text())
        assert "slices" in recipe and "models" not in recipe
        proc = subprocess.run([str(Path(SNAKEMAKE).with_name("remerge")), "merge", str(folder / "mergekit_config.yml"),
                               f"cli/{merge}-{point}", "--out-shard-size", "100K"], cwd=run, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert tensors(run / "cli" / f"{merge}-{point}") == tensors(folder), (merge, point)
    assert tensors(run / "results/lazy/t~0.3/model") != tensors(run / "results/lazy/t~0.7/model")


@slow
def test_changing_one_t_reruns_only_its_point(run, tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    config["merges"]["lazy"]["grid"]["t"] = [0.3, 0.6]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    jobs = jobs_of(snakemake(run, "-n", config=changed, check=True).stdout)
    ran = [(rule, w) for rule, w in jobs if rule != "all"]
    assert ran and all("merge=lazy" in w for rule, w in ran if rule != "collect_grid"), ran
    assert all("t~0.6" in w for rule, w in ran if rule not in ("collect_grid",)), ran
    assert "plan_merge" not in {rule for rule, _ in ran}


def test_a_slice_without_sources_is_refused_in_one_line():
    config = yaml.safe_load(CONFIG.read_text())
    config["merges"]["franken"]["recipe"]["slices"][1] = {"layer_range": [1, 2]}
    with pytest.raises(ConfigError, match=r"merges.franken.recipe.slices\[1\]: .* is not a slice"):
        check_config(config)
    config = yaml.safe_load(CONFIG.read_text())
    config["merges"]["franken"]["recipe"]["slices"][0]["sources"][0]["model"] = "nobody"
    with pytest.raises(ConfigError, match="names model `nobody`"):
        check_config(config)
