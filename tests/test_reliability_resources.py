"""Reliability: resources. A mem_mb limit admits one shard job at a time; the declared mem_mb
covers what the jobs measured, without waste. Shared fixtures: tests/reliability.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import faults
from conftest import snakemake
from reliability import (CONFIG, FIGURES, SHARDS, assert_identical, fault_dir, jobs, most_at_once,
                         start)
from tinymodels import finetune

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reliability_module")]


def benchmark_rss(work: Path, rule: str = "merge_shard") -> dict[str, float]:
    """{wildcards path: max_rss MB} from benchmarks/<merge>/<point>/<rule>/<shard>.tsv."""
    out = {}
    for tsv in (work / "benchmarks").rglob(f"{rule}/*.tsv"):
        header, row = tsv.read_text().splitlines()[:2]
        out[tsv.relative_to(work / "benchmarks").as_posix()] = float(dict(zip(header.split("\t"), row.split("\t")))["max_rss"])
    return out


def declared(out: str, rule: str = "merge_shard") -> dict[str, int]:
    """{benchmark path: declared mem_mb} of the run's (first attempts of) `rule` jobs."""
    found = {}
    for job in jobs(out):
        if job["rule"] == rule:
            w = dict(item.split("=", 1) for item in job["wildcards"].split(", "))
            found.setdefault(f"{w['merge']}/{w['point']}/{rule}/{w['shard']}.tsv", int(job["resources"]["mem_mb"]))
    return found


def test_mem_limit_admits_one_shard_job_at_a_time(space, reference, core_runs):
    """--resources mem_mb=N, with N below two merge_shard jobs' mem_mb, runs them one by one
    (--cores 8 alone runs two at once); threads and mem_mb declared are what the jobs used."""
    from remerge.workflow.config import shard_mem_mb

    plan = json.loads((reference / "results" / "m" / "plan.json").read_text())
    mems = [shard_mem_mb(plan, f"{s}.safetensors") for s in SHARDS]
    limit = max(1000, max(mems))  # plan_merge asks for 1000
    assert 2 * min(mems) > limit

    work = space / "memlimit"
    run = start(work, CONFIG, "--cores", "8", "--resources", f"mem_mb={limit}", pause="merge_shard:record")
    assert run.wait() == 0, run.output()[-3000:]
    out = run.output()
    assert most_at_once(out, "merge_shard") == 1
    spans = faults.records(fault_dir(work))
    assert len(spans) == 3 and all(a["end_ns"] <= b["start_ns"] for a, b in zip(spans, spans[1:])), spans
    assert_identical("--resources mem_mb limit vs reference", work, reference)

    # the unlimited --cores 8 run: two shard jobs overlapped, each with the 4 threads declared
    free = faults.records(fault_dir(core_runs[8]))
    assert any(a["end_ns"] > b["start_ns"] for a, b in zip(free, free[1:])), "no overlap without the limit"
    threads = {j["threads"] for j in jobs((core_runs[8] / "run-0.out").read_text()) if j["rule"] == "merge_shard"}
    assert threads == {"4"} and {(r["omp_num_threads"], r["torch_threads"]) for r in free} == {("4", 4)}

    # declared mem_mb against measured max_rss, every shard job of every run so far
    for label, w in (("reference", reference), ("memlimit", work), ("cores8", core_runs[8])):
        text = (w / "snakemake.out").read_text() if label == "reference" else (w / "run-0.out").read_text()
        want, got = declared(text), benchmark_rss(w)
        assert set(want) == set(got) and len(got) == 3
        for key in sorted(got):
            FIGURES["memory"].append({"run": label, "job": key, "declared_mem_mb": want[key], "max_rss_mb": got[key]})
            assert got[key] <= want[key], (key, got[key], want[key])


WIDE_ROWS = 65536  # x 1024: a 67M-element tensor (134 MB in bf16) per input
SLACK = 3  # declared mem_mb may exceed the measured peak at most this many times


def test_declared_memory_covers_a_large_tensor_without_waste(space):
    """Two merged models and a base, one 67M-element tensor each, where the tensor term of
    workflow.shard_mem_mb (not its 500 MB baseline) dominates: the declared mem_mb covers the
    shard job's max_rss, and is not wildly above it (a limit would then admit too few jobs)."""
    wide = space / "inputs" / "wide"
    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(WIDE_ROWS, 1024, generator=g).to(torch.bfloat16),
            "model.norm.weight": torch.randn(1024, generator=g).to(torch.bfloat16)}
    for name, seed in (("base", None), ("a", 1), ("b", 2)):
        tensors = base if seed is None else finetune(base, seed)
        (wide / name).mkdir(parents=True, exist_ok=True)
        save_file(tensors, wide / name / "model.safetensors", metadata={"format": "pt"})
        (wide / name / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    del base, tensors
    config = yaml.safe_load(CONFIG.read_text())
    for name in ("base", "a", "b"):
        config["models"][name]["path"] = f"../inputs/wide/{name}"
    config["merges"]["m"].update(out_shard_size="100M", transplant_from=None)
    path = space / "wide.yaml"
    path.write_text(yaml.safe_dump(config))
    work = space / "wide"
    proc = snakemake(work, "--cores", "2", config=path, check=True)
    want, got = declared(proc.stdout + proc.stderr), benchmark_rss(work)
    for key in sorted(got):
        FIGURES["memory"].append({"run": "wide (67M-element tensor, 2 merged models + base)", "job": key,
                                  "declared_mem_mb": want[key], "max_rss_mb": got[key]})
    big = max(got, key=got.get)
    assert want[big] > 1000 + 500, "the tensor term should dominate here"
    assert got[big] <= want[big] <= SLACK * got[big], (big, want[big], got[big])
