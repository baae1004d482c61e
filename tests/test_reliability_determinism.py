"""Reliability: determinism. Runs with other core counts give identical bytes; provenance holds no
timestamps. Shared fixtures (`reference`, `core_runs`): tests/reliability.py.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import snakemake
from reliability import CONFIG, assert_identical, most_at_once

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reliability_module")]


def test_runs_and_core_counts_give_identical_bytes(reference, core_runs):
    assert_identical("--cores 1 vs --cores 2 (reference)", core_runs[1], reference)
    assert_identical("--cores 8 vs --cores 2 (reference)", core_runs[8], reference)
    assert_identical("--cores 1 vs --cores 8", core_runs[1], core_runs[8])
    assert most_at_once((core_runs[8] / "run-0.out").read_text(), "merge_shard") >= 2


def test_provenance_has_no_timestamps(reference):
    stamp = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}|\b1[0-9]{9}(\.\d+)?\b")

    def keys(doc, path=""):
        if isinstance(doc, dict):
            for k, v in doc.items():
                yield f"{path}.{k}"
                yield from keys(v, f"{path}.{k}")
        elif isinstance(doc, list):
            for v in doc:
                yield from keys(v, path)

    for prov in (reference / "results").rglob("provenance.json"):
        text = prov.read_text()
        assert not stamp.search(text), (prov, stamp.search(text))
        assert not [k for k in keys(json.loads(text)) if re.search(r"date|time|stamp", k, re.I)]


RANDOM_MERGE = {  # a seeded random method, its own run: the other tests count m's jobs
    "recipe": {"models": [{"model": "a", "parameters": {"weight": 0.6, "density": 0.5}},
                          {"model": "b", "parameters": {"weight": 0.4, "density": 0.7, "epsilon": 0.2}}],
               "merge_method": "della", "base_model": "base", "dtype": "bfloat16"},
    "random_seed": 11, "out_shard_size": "4K", "evaluate": False,
}


def test_a_random_method_gives_the_same_bytes_whatever_the_cores_and_as_one_process(space, tmp_path,
                                                                                   monkeypatch):
    """A della merge run as one job per shard with --cores 1 and --cores 8 equals `remerge
    merge --random-seed 11` of the same recipe in one process; seed 12 gives other bytes."""
    from remerge.cli import main

    config = yaml.safe_load(CONFIG.read_text())
    config["merges"] = {"rand": RANDOM_MERGE}
    path = space / "random.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = {}
    for cores in ("1", "8"):
        work = space / f"random-cores{cores}"
        snakemake(work, "--cores", cores, config=path, check=True)
        runs[cores] = work / "results" / "rand" / "single" / "model"
    shards = sorted(p.name for p in runs["1"].glob("model-*.safetensors"))
    assert len(shards) > 1
    assert [(runs["1"] / s).read_bytes() for s in shards] == [(runs["8"] / s).read_bytes() for s in shards]
    monkeypatch.chdir(runs["1"].parents[3])  # the recipe names the models as the workflow does
    outputs = {}
    for seed in ("11", "12"):
        out = tmp_path / seed / "model"
        assert main(["merge", str(runs["1"] / "mergekit_config.yml"), str(out), "--random-seed", seed,
                     "--out-shard-size", "4K", "--mergekit-version", "0.1.5"]) == 0
        outputs[seed] = [(out / s).read_bytes() for s in shards]
    assert outputs["11"] == [(runs["1"] / s).read_bytes() for s in shards]
    assert outputs["12"] != outputs["11"]
