"""Reliability: kill -9 (the whole run, or one job as the OOM killer would) at several points,
then resume; the end result equals an uninterrupted run. Shared fixtures: tests/reliability.py.
"""

from __future__ import annotations

import time

import pytest

import faults
from conftest import snakemake
from reliability import (CONFIG, EVAL_CONFIG, POINTS, assert_identical, fault_dir, hidden_files, injected, jobs,
                         new_files, resume, rules_run, start)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reliability_module")]


def test_kill_during_shard_write_and_assembly_then_resume(space, reference):
    """Three SIGKILLs of the whole process group (mid shard write, at a job's start, between
    assemble_model's outputs); each rerun resumes; the end result equals the reference."""
    work = space / "killed"
    models = [work / "results" / "m" / p / "model" for p in POINTS]

    # 1. mid shard write: the first merge_shard job stops after its first tensor
    run = start(work, CONFIG, "--cores", "2", pause="merge_shard:write")
    run.wait_for(lambda: faults.paused_pid(fault_dir(work)), what="a merge_shard job writing")
    partial = [p for m in models for p in m.glob(".*.safetensors.tmp-*")]
    assert partial and all(p.stat().st_size > 8 for p in partial), "no half-written shard on disk"
    run.kill()
    injected("SIGKILL process group", "merge_shard, mid write (a half-written .tmp- shard on disk)")
    assert not any((m / "model.safetensors.index.json").exists() for m in models)

    # 2. the rerun, killed the moment its first merge_shard job starts (no pause: a race)
    snakemake(work, "--unlock", config=CONFIG, check=True)
    begun = time.time_ns()
    logs = [work / "logs" / "m" / p / "merge_shard" for p in POINTS]
    run = start(work, CONFIG, "--cores", "2", "--rerun-incomplete")
    run.wait_for(lambda: any(new_files(d, begun, "*.log") for d in logs), what="a merge_shard job starting")
    run.kill()
    injected("SIGKILL process group", "merge_shard, as the job starts")

    # 3. the next rerun, killed between assemble_model's outputs (tensors.json written, index not)
    snakemake(work, "--unlock", config=CONFIG, check=True)
    run = start(work, CONFIG, "--cores", "2", "--rerun-incomplete", pause="assemble_model:index")
    run.wait_for(lambda: faults.paused_pid(fault_dir(work)), what="assemble_model between outputs")
    run.kill()
    injected("SIGKILL process group", "assemble_model, tensors.json written, index not")
    shards = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for m in models for p in m.glob("model-*.safetensors")}
    assert len(shards) == 3, "every shard was done before the assembly"

    # the user's way back: a plain rerun refuses and says how; then resume
    proc = resume(work, CONFIG)
    assert rules_run(proc.stdout + proc.stderr) <= {"assemble_model", "transplant_configs", "write_model_card", "all"}
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards} == shards, "finished shards were redone"
    assert hidden_files(work / "results") == [], "a killed writer's temporary file is left"
    assert_identical("kill x3 (shard write, job start, assembly) vs reference", work, reference)
    assert "Nothing to be done" in snakemake(work, "-n", config=CONFIG, check=True).stdout


def test_job_killed_alone_is_retried_with_more_memory(space, reference):
    """SIGKILL of one merge_shard job only, as the OOM killer would: Snakemake retries it
    (mem_mb one half larger), the run completes by itself and equals the reference."""
    work = space / "oom"
    run = start(work, CONFIG, "--cores", "2", "--retries", "1", pause="merge_shard:write")
    pid = run.wait_for(lambda: faults.paused_pid(fault_dir(work)), what="a merge_shard job writing")
    faults.kill_job(pid)
    injected("SIGKILL one job (OOM-killer style)", "merge_shard, mid write")
    assert run.wait() == 0, run.output()[-3000:]
    out = run.output()
    retried = [j for j in jobs(out) if j["rule"] == "merge_shard"]
    by_shard: dict[str, list[int]] = {}
    for j in retried:
        by_shard.setdefault(j["wildcards"], []).append(int(j["resources"]["mem_mb"]))
    [mems] = [m for m in by_shard.values() if len(m) > 1]
    assert mems[1] > mems[0], mems  # attempt 2 asks for more (workflow.shard_mem_mb)
    assert hidden_files(work / "results") == []
    assert_identical("one job SIGKILLed, retried in-run vs reference", work, reference)


def test_kill_during_evaluation_then_resume(space, demo_inputs):
    """SIGKILL between evaluate_model's outputs (results.json written, scores.json not), then
    again mid lm-eval; the resumed run equals an uninterrupted one (lm-eval's date aside)."""
    work = space / "eval"
    snakemake(work, "--cores", "2", config=EVAL_CONFIG, check=True)
    reference = space / "eval-reference"
    work.rename(reference)  # results.json records its run folder: run both in the same one

    run = start(work, EVAL_CONFIG, "--cores", "2", pause="evaluate_model:scores")
    run.wait_for(lambda: faults.paused_pid(fault_dir(work)), what="evaluate_model between outputs")
    point = work / "results" / "seed" / "single"
    assert (point / "eval" / "results.json").is_file() and not (point / "scores.json").exists()
    run.kill()
    injected("SIGKILL process group", "evaluate_model, results.json written, scores.json not")

    snakemake(work, "--unlock", config=EVAL_CONFIG, check=True)
    log = work / "logs" / "seed" / "single" / "evaluate_model.log"
    log.unlink()  # the killed attempt's: wait for the new one
    run = start(work, EVAL_CONFIG, "--cores", "2", "--rerun-incomplete")
    run.wait_for(lambda: log.is_file() and "loading" in log.read_text(), what="lm-eval running")
    run.kill()
    injected("SIGKILL process group", "evaluate_model, lm-eval loading/evaluating")

    proc = resume(work, EVAL_CONFIG)
    assert rules_run(proc.stdout + proc.stderr) <= {"evaluate_model", "write_model_card", "collect_grid", "all"}
    assert hidden_files(work / "results") == []
    assert_identical("kill x2 (evaluation) vs reference", work, reference)
    assert "Nothing to be done" in snakemake(work, "-n", config=EVAL_CONFIG, check=True).stdout
