"""Reliability: the cluster profile. Dry runs with profiles/slurm show each rule's resources,
including merge_shard's mem_mb from the plan. Shared fixtures: tests/reliability.py.
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, snakemake
from reliability import CONFIG, jobs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reliability_module")]


@pytest.fixture(scope="module")
def slurm_dry_run(tmp_path_factory) -> str:
    """`snakemake --profile profiles/slurm -n --configfile config/supernova_lite.yaml`."""
    work = tmp_path_factory.mktemp("slurm")
    proc = snakemake(work, "--profile", str(ROOT / "profiles" / "slurm"), "-n",
                     config=ROOT / "config" / "supernova_lite.yaml", check=True)
    return proc.stdout + proc.stderr


def _by_rule(text: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for job in jobs(text):
        out.setdefault(job["rule"], []).append(job)
    return out


def test_slurm_dry_run_shows_per_rule_resources(slurm_dry_run):
    rules = _by_rule(slurm_dry_run)
    assert {"download_model", "plan_merge", "evaluate_model", "evaluate_reference", "write_model_card"} <= set(rules)
    for job in rules["download_model"]:  # on a node that can reach the hub
        r = job["resources"]
        assert r["slurm_partition"] == "<network-partition>" and r["network"] == "1" and r["runtime"] == "480"
        assert job["threads"] == "2"
    for job in rules["evaluate_model"] + rules["evaluate_reference"]:
        r = job["resources"]
        assert r["gpu"] == "1" and r["slurm_partition"] == "<gpu-partition>" and r["runtime"] == "1440"
        assert r["cpus_per_gpu"] == "8" and job["threads"] == "8"
    for rule in ("plan_merge", "assemble_model", "transplant_configs", "write_model_card"):
        for job in rules[rule]:
            assert job["resources"]["slurm_partition"] == "<cpu-partition>"
            assert job["resources"]["slurm_account"] == "<account>"


def test_slurm_dry_run_keeps_the_profiles_memory(slurm_dry_run):
    rules = _by_rule(slurm_dry_run)
    assert {j["resources"]["mem_mb"] for j in rules["evaluate_model"] + rules["evaluate_reference"]} == {"64000"}


def test_slurm_dry_run_shows_shard_memory_from_the_plan(reference):
    """Once a plan exists, the dry run lists merge_shard jobs with mem_mb from the shard's
    tensors (workflow.shard_mem_mb), on the cpu partition."""
    from remerge.workflow.config import shard_mem_mb

    proc = snakemake(reference, "--profile", str(ROOT / "profiles" / "slurm"), "-n",
                     "--forcerun", "merge_shard", config=CONFIG, check=True)
    plan = json.loads((reference / "results" / "m" / "plan.json").read_text())
    shard_jobs = _by_rule(proc.stdout + proc.stderr)["merge_shard"]
    assert len(shard_jobs) == 3
    for job in shard_jobs:
        shard = job["wildcards"].rsplit("shard=", 1)[1]
        assert int(job["resources"]["mem_mb"]) == shard_mem_mb(plan, f"{shard}.safetensors")
        assert job["resources"]["slurm_partition"] == "<cpu-partition>" and job["threads"] == "4"
