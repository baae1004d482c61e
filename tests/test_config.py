"""A bad config fails before any job runs, with one line naming the key, and writes nothing."""

import copy

import pytest
import yaml

from conftest import ROOT, snakemake

DEMO = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def mutated(change) -> dict:
    config = copy.deepcopy(DEMO)
    change(config)
    return config


def rename_key(d, old, new):
    d[new] = d.pop(old)


CASES = {
    "typo": (lambda c: rename_key(c["merges"]["sweep"]["grid"], "density", "densty"),
             "unknown key `densty` in merges.sweep.grid: ties has no numeric parameter of that name "
             "(allowed: density, lambda, weight)"),
    "typo_top": (lambda c: rename_key(c, "evaluation", "evalution"), "unknown key `evalution`"),
    "grid_density": (lambda c: c["merges"]["sweep"]["grid"].update(density=[0.5, 1.5]),
                     "merges.sweep.grid.density[1]: 1.5 is out of range: density must be in (0, 1]"),
    "zero_density": (lambda c: c["merges"]["sweep"]["grid"].update(density=[0]),
                     "merges.sweep.grid.density[0]: 0 is out of range: density must be in (0, 1]"),
    "recipe_density": (lambda c: c["merges"]["sweep"]["recipe"]["models"][0]["parameters"].update(density=2),
                       None),  # the grid overrides the recipe's density: still valid
    "negative_weight": (lambda c: c["merges"]["sweep"]["grid"].update(weight=[-0.5]),
                        "merges.sweep.grid.weight[0]: -0.5 is out of range: weight must be >= 0"),
    "recipe_weight": (lambda c: c["merges"].pop("sweep") and c["merges"]["seed"].update(
        recipe=c["merges"]["seed"]["recipe"].replace("weight: 1\n", "weight: -1\n", 1)),
        "merges.seed.recipe.models[0].parameters.weight: -1 is negative (allowed: weight >= 0)"),
    "method": (lambda c: c["merges"]["sweep"]["recipe"].update(merge_method="tiez"),
               "merge_method `tiez` is not supported (did you mean `ties`? supported: ties, "
               "task_arithmetic, "),
    "missing_model": (lambda c: c["merges"]["sweep"]["recipe"].update(base_model="basse"),
                      "merges.sweep.recipe names model `basse`, which is not in models: (known: base, instruct)"),
    "missing_folder": (lambda c: c["models"].update(base={"path": "/no/such/model"}),
                       "models.base.path: /no/such/model does not exist; give the folder that holds the model's"),
    "path_like_name": (lambda c: c["merges"].update({"../x": c["merges"].pop("sweep")}),
                       "merges: '../x' is not allowed: letters, digits, _ . - (no slashes, no leading dot)"),
    "bad_source": (lambda c: c["models"].update(base={"demo": "large"}),
                   "models.base.demo: 'large' is not allowed (allowed: base, instruct)"),
    "two_sources": (lambda c: c["models"].update(base={"demo": "base", "path": "/tmp"}),
                    "models.base: exactly one of demo, path, repo"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_fails_before_any_job(case, tmp_path):
    change, message = CASES[case]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(mutated(change)))
    proc = snakemake(tmp_path, "-n", config=config)
    if message is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
        return
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if message in line]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "logs").exists()
