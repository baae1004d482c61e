"""Reliability: kill -9 at several points and resume, determinism, bad inputs, resources.

Every test runs the real workflow (Snakemake in a subprocess) in folders of its own, next to
one shared `inputs/` folder that holds the input models (tests/configs/reliability*.yaml name
them as ../inputs/...). An interrupted run and the uninterrupted run it is compared with share
nothing but those inputs; where a result records the absolute path of its run folder (lm-eval's
results.json), the reference is run in the same folder first and then moved aside.

The figures (faults injected, bad inputs tried, bytes that differed afterwards, declared and
measured memory) are written to `reliability.json` in pytest's temporary folder and printed
at the end of the module.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import faults
from conftest import ROOT, SNAKEMAKE, offline_env, snakemake
from tinymodels import finetune, random_tensors, write_model

pytestmark = pytest.mark.slow

CONFIGS = ROOT / "tests" / "configs"
CONFIG = CONFIGS / "reliability.yaml"
EVAL_CONFIG = CONFIGS / "reliability_eval.yaml"
POINTS = ["density~0.5"]
SHARDS = [f"model-{i:05d}-of-00003" for i in (1, 2, 3)]
TIME_KEYS = {"results.json": ["date"]}  # lm-eval's wall-clock time of the evaluation

FIGURES: dict = {"faults_injected": 0, "faults": [], "bad_inputs_tried": 0, "bad_inputs": [],
                 "bytes_differing": 0, "comparisons": [], "memory": [], "time_dependent": []}


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def figures(request, tmp_path_factory):
    yield FIGURES
    faults.Workflow.kill_leftovers()
    out = tmp_path_factory.getbasetemp() / "reliability.json"
    out.write_text(json.dumps(FIGURES, indent=2) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(
                f"reliability: faults injected {FIGURES['faults_injected']}, bad inputs tried "
                f"{FIGURES['bad_inputs_tried']}, bytes differing {FIGURES['bytes_differing']} "
                f"over {len(FIGURES['comparisons'])} comparisons (details: {out})")


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    """The module's folder: inputs/ (shared, read only) and one folder per run."""
    root = tmp_path_factory.mktemp("reliability")
    base = random_tensors(0)
    write_model(root / "inputs" / "base", base, shards=3)
    write_model(root / "inputs" / "a", finetune(base, 1))
    write_model(root / "inputs" / "b", finetune(base, 2), shards=2)
    return root


@pytest.fixture(scope="module")
def reference(space) -> Path:
    """The uninterrupted run of tests/configs/reliability.yaml that the others must equal."""
    work = space / "reference"
    proc = snakemake(work, "--cores", "2", config=CONFIG, check=True)
    (work / "snakemake.out").write_text(proc.stdout + proc.stderr)
    return work


@pytest.fixture(scope="module")
def demo_inputs(space) -> Path:
    from remerge.demo.models import build_demo_models

    build_demo_models(space / "inputs" / "demo", seed=0)
    return space / "inputs" / "demo"


# --- helpers --------------------------------------------------------------------------------


def command(work: Path, config: Path, *args: str) -> list[str]:
    return [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(work), *args,
            "--configfile", str(config)]


def fault_dir(work: Path) -> Path:
    return work.parent / f"faults-{work.name}"


def start(work: Path, config: Path, *args: str, pause: str | None = None) -> faults.Workflow:
    """A run in the background (its output in <work>/run-<n>.out), optionally with a pause point."""
    work.mkdir(parents=True, exist_ok=True)
    extra = faults.pause_env(fault_dir(work), pause) if pause else {}
    n = len(list(work.glob("run-*.out")))
    return faults.Workflow(command(work, config, *args), offline_env(**extra), work / f"run-{n}.out")


def injected(kind: str, where: str) -> None:
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append({"kind": kind, "where": where})


def hidden_files(results: Path) -> list[str]:
    """Temporaries and other hidden files anywhere under results/ (there should be none)."""
    return sorted(p.relative_to(results).as_posix() for p in results.rglob(".*"))


def new_files(folder: Path, since_ns: int, pattern: str) -> list[Path]:
    return [p for p in folder.glob(pattern) if p.stat().st_mtime_ns >= since_ns] if folder.is_dir() else []


def resume(work: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    """What a user does after a crash: the plain rerun refuses and says what to do (rerun the
    incomplete files, unlock the directory); unlock; rerun with --rerun-incomplete."""
    locked = snakemake(work, "--cores", "2", config=config)
    said = locked.stdout + locked.stderr
    assert locked.returncode != 0 and ("--unlock" in said or "--rerun-incomplete" in said)
    snakemake(work, "--unlock", config=config, check=True)
    return snakemake(work, "--cores", "2", "--rerun-incomplete", *args, config=config, check=True)


def normalized(rel: str, data: bytes) -> bytes:
    """The bytes of a result with its time-dependent fields taken out (only lm-eval's date)."""
    keys = TIME_KEYS.get(rel.rsplit("/", 1)[-1])
    if not keys:
        return data
    doc = json.loads(data)
    for key in keys:
        doc.pop(key, None)
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def compare(label: str, got: Path, want: Path) -> dict:
    """Compare two results/ trees byte for byte (time-dependent fields aside); record it."""
    a, b = faults.tree(got / "results"), faults.tree(want / "results")
    raw = faults.compare_trees(a, b)
    for rel in raw["differing"]:
        if normalized(rel, a[rel]) != a[rel]:
            FIGURES["time_dependent"].append({"comparison": label, "file": rel, "keys": TIME_KEYS[rel.rsplit("/", 1)[-1]],
                                              "raw_bytes_differing": faults.bytes_differing(a[rel], b[rel])})
    result = faults.compare_trees({k: normalized(k, v) for k, v in a.items()},
                                  {k: normalized(k, v) for k, v in b.items()})
    FIGURES["bytes_differing"] += result["bytes_differing"]
    FIGURES["comparisons"].append({"comparison": label, "files": result["files"], "bytes": result["bytes"],
                                   "bytes_differing": result["bytes_differing"]})
    return result


def assert_identical(label: str, got: Path, want: Path) -> None:
    result = compare(label, got, want)
    assert not (result["missing"] or result["extra"] or result["differing"]), result
    assert result["bytes_differing"] == 0


def jobs(text: str) -> list[dict]:
    """The job blocks of a Snakemake log, in order: rule, jobid, wildcards, threads,
    resources; with `finished` / `failed` set from the lines that end them."""
    blocks: list[dict] = []
    by_id: dict[str, list[dict]] = {}
    current = None
    failed_rule = None
    for line in text.splitlines():
        if m := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line):
            current = {"rule": m[1]}
            blocks.append(current)
            continue
        if m := re.match(r"^Error in rule (\w+):$", line):
            current, failed_rule = None, m[1]
            continue
        if m := re.match(r"^\s+(\w+): (.*)$", line):
            key, value = m[1], m[2]
            if current is not None:
                if key == "resources":
                    value = dict(item.split("=", 1) for item in value.split(", "))
                current[key] = value
                if key == "jobid":
                    by_id.setdefault(value, []).append(current)
            elif failed_rule and key == "jobid":
                by_id[value][-1]["failed"] = True
                failed_rule = None
            continue
        current = None
        if m := re.match(r"^Finished jobid: (\d+)", line):
            by_id[m[1]][-1]["finished"] = True
    return blocks


def events(text: str) -> list[tuple[str, dict]]:
    """Starts and ends of jobs in log order."""
    out, by_id, current, failed = [], {}, None, False
    for line in text.splitlines():
        if m := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line):
            current, failed = {"rule": m[1]}, False
            continue
        if re.match(r"^Error in rule (\w+):$", line):
            current, failed = None, True
            continue
        if m := re.match(r"^\s+jobid: (\d+)$", line):
            if current is not None:
                by_id[m[1]] = current
                out.append(("start", current))
            elif failed and m[1] in by_id:
                out.append(("end", by_id[m[1]]))
            continue
        if m := re.match(r"^Finished jobid: (\d+)", line):
            out.append(("end", by_id[m[1]]))
        if not line.startswith(" "):
            current = None
    return out


def most_at_once(text: str, rule: str) -> int:
    running, most = 0, 0
    for kind, job in events(text):
        if job["rule"] == rule:
            running += 1 if kind == "start" else -1
            most = max(most, running)
    return most


def rules_run(text: str) -> set[str]:
    return {job["rule"] for job in jobs(text)}


# --- kill -9 and resume ---------------------------------------------------------------------


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


# --- determinism ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def core_runs(space) -> dict[int, Path]:
    """The reliability config with --cores 1 and --cores 8 (jobs with 1 and 4 threads, one
    and two shard jobs at a time); --cores 8 also records what each shard job ran with."""
    out = {}
    for cores in (1, 8):
        work = space / f"cores{cores}"
        run = start(work, CONFIG, "--cores", str(cores), pause="merge_shard:record" if cores == 8 else None)
        assert run.wait() == 0, run.output()[-3000:]
        out[cores] = work
    return out


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


# --- resources ------------------------------------------------------------------------------


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


# --- bad inputs -----------------------------------------------------------------------------

# Config files that must fail before any job runs with one clear line, writing nothing.
# (tests/test_config.py has unknown grid and top-level keys, value ranges, the method, missing
# models and folders, `../x` as a merge name, the demo source and two sources.)
RAW_CONFIGS = {
    "yaml_syntax": ("models:\n  base: {path: ../inputs/base\nmerges: [\n", "Config file is not valid JSON or YAML"),
    "yaml_tabs": ("models:\n\tbase:\n\t\tpath: ../inputs/base\n", "Config file is not valid JSON or YAML"),
    "empty_file": ("", "Config file must be given as JSON or YAML with keys at top level"),
    "top_level_list": ("- models\n- merges\n", "Config file must be given as JSON or YAML with keys at top level"),
}


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


CONFIG_CASES = {
    "merge_name_absolute": (lambda c: _rename(c["merges"], "m", "/tmp/evil"),
                            "merges: '/tmp/evil' is not allowed: letters, digits, _ . - (no slashes, no leading dot)"),
    "merge_name_slash": (lambda c: _rename(c["merges"], "m", "a/../../b"), "merges: 'a/../../b' is not allowed"),
    "merge_name_dotdot": (lambda c: _rename(c["merges"], "m", ".."), "merges: '..' is not allowed"),
    "merge_name_hidden": (lambda c: _rename(c["merges"], "m", ".m"), "merges: '.m' is not allowed"),
    "merge_name_reserved": (lambda c: _rename(c["merges"], "m", "models"),
                            "merges.models: not a usable merge name"),
    "model_name_pathlike": (lambda c: _rename(c["models"], "a", "../a"), "models: '../a' is not allowed"),
    "audit_name_pathlike": (lambda c: c.update(audits={"../audit": {"published": "../inputs/a"}}),
                            "audits: '../audit' is not allowed"),
    "unknown_model_key": (lambda c: c["models"]["a"].update(revison="main"),
                          "unknown key `revison` in models.a (allowed: demo, license, path, repo, revision)"),
    "unknown_merge_key": (lambda c: c["merges"]["m"].update(transplant_form="a"),
                          "unknown key `transplant_form` in merges.m"),
    "unknown_evaluation_key": (lambda c: c["evaluation"].update(batchsize=8),
                               "unknown key `batchsize` in evaluation"),
    "unknown_demo_key": (lambda c: c.update(demo={"sed": 1}), "unknown key `sed` in demo (allowed: seed)"),
    "missing_merges": (lambda c: c.pop("merges"), "(top level): 'merges' is a required property"),
    "missing_recipe": (lambda c: c["merges"]["m"].pop("recipe"), "merges.m: 'recipe' is a required property"),
    "recipe_not_a_recipe": (lambda c: c["merges"]["m"].update(recipe=42),
                            "merges.m.recipe: 42 is not of type 'object', 'string'"),
    "shard_size_unit": (lambda c: c["merges"]["m"].update(out_shard_size="5GB"),
                        "merges.m.out_shard_size: '5GB' is not allowed: bytes, or a number with K / M / B"),
    "mergekit_version": (lambda c: c["merges"]["m"].update(mergekit_version="0.2"),
                         "merges.m.mergekit_version: '0.2' is not allowed"),
    "grid_empty": (lambda c: c["merges"]["m"]["grid"].update(density=[]), "merges.m.grid.density: [] should be non-empty"),
    "grid_key_for_other_method": (lambda c: c["merges"]["m"]["grid"].update(gamma=[0.1]),
                                  "merges.m.recipe: models[0].parameters: unknown parameter `gamma` for ties"),
    "recipe_dtype": (lambda c: c["merges"]["m"]["recipe"].update(dtype="float8"),
                     "merges.m.recipe: dtype `float8` is not supported (allowed: bfloat16, float16, float32)"),
    "weight_not_a_number": (lambda c: c["merges"]["m"]["recipe"]["models"][0]["parameters"].update(weight="heavy"),
                            "merges.m.recipe: models[0].parameters.weight: 'heavy' is not a number"),
    "eval_dtype": (lambda c: c["evaluation"].update(dtype="fp8"), "evaluation.dtype: 'fp8' is not allowed"),
    "model_path_is_a_file": (lambda c: c["models"]["a"].update(path="../inputs/a/config.json"),
                             "models.a.path: ../inputs/a/config.json is a file, not a folder"),
}


def _dry_run(space: Path, name: str, text: str) -> tuple[str, subprocess.CompletedProcess, Path]:
    """A dry run in a folder next to inputs/ (the configs name ../inputs/...)."""
    work = space / f"bad-config-{name}"
    config = space / f"bad-config-{name}.yaml"
    config.write_text(text)
    return name, snakemake(work, "-n", config=config), work


def test_bad_configs_fail_with_one_line_before_any_job(space):
    base = yaml.safe_load(CONFIG.read_text())
    texts = dict((k, v[0]) for k, v in RAW_CONFIGS.items())
    for name, (change, _) in CONFIG_CASES.items():
        config = copy.deepcopy(base)
        change(config)
        texts[name] = yaml.safe_dump(config)
    expected = {**{k: v[1] for k, v in RAW_CONFIGS.items()}, **{k: v[1] for k, v in CONFIG_CASES.items()}}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda item: _dry_run(space, *item), texts.items()))
    problems = []
    for name, proc, work in results:
        FIGURES["bad_inputs_tried"] += 1
        FIGURES["bad_inputs"].append({"kind": "config", "case": name, "message": expected[name]})
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or not any(expected[name] in line for line in out.splitlines()):
            problems.append(f"{name}: rc {proc.returncode}\n{out[-1500:]}")
        if (work / "results").exists() or (work / "logs").exists():
            problems.append(f"{name}: wrote results/ or logs/")
    assert not problems, "\n\n".join(problems)


def test_recipe_text_with_a_yaml_error_names_the_merge(space):
    config = yaml.safe_load(CONFIG.read_text())
    config["merges"]["m"]["recipe"] = "models: [\n  - model: a\n"
    FIGURES["bad_inputs_tried"] += 1
    FIGURES["bad_inputs"].append({"kind": "config", "case": "recipe_text_yaml_error", "message": "(raw ParserError)"})
    _, proc, work = _dry_run(space, "recipe_text_yaml_error", yaml.safe_dump(config))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (work / "results").exists()
    assert any("config error: merges.m.recipe" in line for line in out.splitlines()), out[-1500:]


# Damaged input models, each the only merged model of a merge of its own (all derived from
# inputs/b: two shards and an index). stage: the job that must fail; expect: what its log says.
def _header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


SHARD1, SHARD2, INDEX = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"


def _shard_of(folder: Path, tensor: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][tensor]


def _replace_tensor(folder: Path, name: str, value: torch.Tensor | None) -> Path:
    shard = _shard_of(folder, name)
    tensors = load_file(shard)
    if value is None:
        del tensors[name]
        index = json.loads((folder / INDEX).read_text())
        del index["weight_map"][name]
        (folder / INDEX).write_text(json.dumps(index))
    else:
        tensors[name] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def _overlap(folder: Path) -> Path:
    """Two same-sized tensors of shard 1 pointing at the same bytes: the header passes remerge's
    checks (sizes, bounds) but safetensors refuses the file when a shard job opens it."""
    shard = folder / SHARD1
    header, body = _header(shard.read_bytes())
    groups: dict = {}
    for name, entry in sorted(header.items()):
        if name != "__metadata__":
            groups.setdefault((entry["dtype"], tuple(entry["shape"])), []).append(name)
    first, second = next(names for names in groups.values() if len(names) > 1)[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    shard.write_bytes(_with_header(header, body))
    return shard


def _duplicate(folder: Path) -> Path:
    """model.norm.weight stored in both shards (a botched re-sharding)."""
    source = _shard_of(folder, "model.norm.weight")
    other = folder / (SHARD2 if source.name == SHARD1 else SHARD1)
    tensors = load_file(other)
    tensors["model.norm.weight"] = load_file(source)["model.norm.weight"]
    save_file(tensors, other, metadata={"format": "pt"})
    return folder  # the message names the model's folder and both file names


def _garbage_json(path: Path) -> Path:
    header, body = _header(path.read_bytes())
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    path.write_bytes(struct.pack("<Q", n) + b"{not json at all" + b"!" * (n - 16) + body)
    return path


def _remove(folder: Path, *names: str) -> Path:
    for name in names:
        (folder / name).unlink()
    return folder


MODEL_CASES = {
    # case: (damage(folder) -> the path the message must name, stage, message parts)
    "truncated_data": (lambda f: (f / SHARD2).write_bytes((f / SHARD2).read_bytes()[:-100]) and f / SHARD2,
                       "plan_merge", ["the file is truncated or damaged", "tensor "]),
    "truncated_header": (lambda f: (f / SHARD1).write_bytes((f / SHARD1).read_bytes()[:5]) and f / SHARD1,
                         "plan_merge", ["truncated safetensors file (5 bytes, no header)"]),
    "empty_shard": (lambda f: (f / SHARD1).write_bytes(b"") or f / SHARD1,
                    "plan_merge", ["truncated safetensors file (0 bytes, no header)"]),
    "header_length_garbage": (lambda f: (f / SHARD1).write_bytes(b"\xff" * 8 + (f / SHARD1).read_bytes()[8:]) and f / SHARD1,
                              "plan_merge", ["not a safetensors file or truncated"]),
    "garbage_header": (lambda f: _garbage_json(f / SHARD1), "plan_merge", ["safetensors header is not valid JSON"]),
    "unsupported_dtype": (lambda f: _replace_tensor(f, "model.norm.weight", torch.zeros(16, dtype=torch.float8_e5m2)),
                          "plan_merge", ["tensor model.norm.weight has unsupported dtype F8_E5M2"]),
    "mismatched_shape": (lambda f: _replace_tensor(f, "model.norm.weight", torch.zeros(7, dtype=torch.bfloat16)),
                         "plan_merge", ["tensor model.norm.weight: shape [7] in model ../inputs/bad/mismatched_shape",
                                        "merging needs identical shapes"]),
    "missing_tensor": (lambda f: _replace_tensor(f, "model.layers.2.mlp.down_proj.weight", None) and f,
                       "plan_merge", ["tensor model.layers.2.mlp.down_proj.weight is missing from model "
                                      "../inputs/bad/missing_tensor"]),
    "index_missing_shard": (lambda f: _remove(f, SHARD2) and f / INDEX, "plan_merge",
                            [f"names shard {SHARD2}, which is missing from ../inputs/bad/index_missing_shard"]),
    "broken_index": (lambda f: (f / INDEX).write_text("{\"weight_map\": {") and f / INDEX,
                     "plan_merge", ["unreadable index"]),
    "pickle_only": (lambda f: _remove(f, SHARD1, SHARD2, INDEX).joinpath("pytorch_model.bin").write_bytes(b"\x80\x04not really")
                    and f, "plan_merge", ["has only pickle weights (pytorch_model.bin)", "execute arbitrary code"]),
    "no_weights": (lambda f: _remove(f, SHARD1, SHARD2, INDEX), "plan_merge",
                   ["no *.safetensors weights in ../inputs/bad/no_weights"]),
    "empty_folder": (lambda f: _remove(f, SHARD1, SHARD2, INDEX, "config.json"), "record_model",
                     ["the folder holds no files"]),
    "duplicate_tensor": (_duplicate, "plan_merge", [f"tensor model.norm.weight is in both {SHARD1} and {SHARD2}"]),
    # the header passes the size checks but its data_offsets overlap
    "overlapping_offsets": (_overlap, "plan_merge", ["overlapping the previous tensor"]),
}
KNOWN_GAPS: set[str] = set()
REPAIRED = ["truncated_data", "overlapping_offsets"]  # fixed in place, then rerun


def _model_config(cases) -> dict:
    config = {"models": {"base": {"path": "../inputs/base"}}, "merges": {}, "evaluation": {"references": False}}
    for case in cases:
        config["models"][f"bad_{case}"] = {"path": f"../inputs/bad/{case}"}
        config["merges"][case] = {
            "recipe": {"models": [{"model": f"bad_{case}", "parameters": {"weight": 0.6, "density": 0.7}}],
                       "merge_method": "ties", "base_model": "base",
                       "parameters": {"normalize": True, "int8_mask": True}, "dtype": "bfloat16"},
            "evaluate": False,
        }
    return config


@pytest.fixture(scope="module")
def bad_models(space) -> dict:
    """One run (--keep-going) over a merge per damaged model; its log and what it left."""
    bad = space / "inputs" / "bad"
    named = {}
    for case, (damage, stage, parts) in MODEL_CASES.items():
        shutil.copytree(space / "inputs" / "b", bad / case)
        named[case] = str(damage(bad / case)).replace(str(space / "inputs"), "../inputs")
        FIGURES["bad_inputs_tried"] += 1
        FIGURES["bad_inputs"].append({"kind": "model", "case": case, "failing_job": stage, "message": parts})
    config = space / "bad-models.yaml"
    config.write_text(yaml.safe_dump(_model_config(MODEL_CASES)))
    work = space / "bad-models"
    proc = snakemake(work, "--cores", "2", "--keep-going", config=config)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    failed = [(j["rule"], j.get("wildcards", "")) for j in jobs(out) if j.get("failed")]
    return {"work": work, "config": config, "named": named, "out": out, "failed": failed, "bad": bad}


def _failed_logs(run: dict, case: str, stage: str) -> tuple[list[tuple[str, str]], str]:
    """The case's failed jobs of `stage` and the text of their logs."""
    key = f"model=bad_{case}" if stage == "record_model" else f"merge={case}"
    failed = [(r, w) for r, w in run["failed"] if r == stage and (key + ",") in (w + ",")]
    logs = run["work"] / "logs"
    paths = {"record_model": [logs / "models" / f"bad_{case}" / "record_model.log"],
             "plan_merge": [logs / case / "plan_merge.log"]}.get(stage)
    if paths is None:
        paths = [logs / case / "single" / "merge_shard" / f"{w.rsplit('shard=', 1)[1]}.log" for _, w in failed]
    return failed, "\n".join(p.read_text() for p in paths if p.is_file())


def test_bad_models_fail_in_their_job_with_a_message_naming_the_file(bad_models):
    problems = []
    for case, (_, stage, parts) in MODEL_CASES.items():
        if case in KNOWN_GAPS:
            continue
        failed, text = _failed_logs(bad_models, case, stage)
        if not failed:
            problems.append(f"{case}: no failed {stage} job")
        for part in parts + [bad_models["named"][case]]:
            if part not in text:
                problems.append(f"{case}: the {stage} log does not say {part!r}:\n{text[-1500:]}")
    assert not problems, "\n".join(problems)


def test_overlapping_offsets_are_refused_naming_the_file(bad_models):
    results = bad_models["work"] / "results" / "overlapping_offsets"
    failed = [(r, w) for r, w in bad_models["failed"] if "merge=overlapping_offsets" in w]
    texts = [_failed_logs(bad_models, "overlapping_offsets", stage)[1] for stage in ("plan_merge", "merge_shard")]
    assert failed, "the merge of a file with overlapping data_offsets succeeded"
    assert any("offset" in t and bad_models["named"]["overlapping_offsets"] in t for t in texts)
    assert not (results / "single" / "tensors.json").exists()


def test_bad_models_leave_no_file_a_later_run_would_trust(bad_models):
    results = bad_models["work"] / "results"
    problems = []
    for case, (_, stage, _) in MODEL_CASES.items():
        if case in KNOWN_GAPS:
            continue
        failed, _ = _failed_logs(bad_models, case, stage)
        if (results / "models" / f"bad_{case}" / "manifest.json").exists() and stage == "record_model":
            problems.append(f"{case}: the manifest.json of a failed record_model job")
        left = sorted(p.relative_to(results).as_posix() for p in (results / case).rglob("*") if p.is_file()) \
            if (results / case).exists() else []
        if stage == "merge_shard":  # shards of jobs that failed are gone; nothing after them exists
            for _, w in failed:
                shard = w.rsplit("shard=", 1)[1]
                if [p for p in left if shard in p]:
                    problems.append(f"{case}: an output of the failed merge_shard job for {shard} remains")
            left = [p for p in left if not re.search(r"(model(-\d+-of-\d+)?\.safetensors|digests/.*\.json|plan\.json)$", p)]
        if left:
            problems.append(f"{case}: files left after its {stage} job failed: {left}")
    hidden = hidden_files(results)
    if hidden:
        problems.append(f"temporary or hidden files left: {hidden}")
    assert not problems, "\n".join(problems)


def test_bad_models_repaired_in_place_are_recorded_anew(bad_models):
    """Fix two of them in place (as `cp` over the file, or a re-download, would) and rerun:
    the manifests are re-recorded (not the broken files' ones trusted), and the merges equal
    `remerge merge` of the intact model."""
    work, bad, results = bad_models["work"], bad_models["bad"], bad_models["work"] / "results"
    good = bad.parent / "b"
    for case in REPAIRED:
        for name in (SHARD1, SHARD2):
            target = bad / case / name
            if not target.exists() or target.read_bytes() != (good / name).read_bytes():
                with open(target, "wb") as f:  # the same inode: the folder's mtime does not change
                    f.write((good / name).read_bytes())
    targets = [f"results/{case}/single/provenance.json" for case in REPAIRED]
    snakemake(work, "--cores", "2", *targets, config=bad_models["config"], check=True)
    ref = work.parent / "bad-models-cli"
    recipe = work.parent / "bad-models-cli.yml"
    recipe.write_text((results / REPAIRED[0] / "single" / "model" / "mergekit_config.yml").read_text()
                      .replace(f"../inputs/bad/{REPAIRED[0]}", "../inputs/b"))
    cli = subprocess.run([str(Path(SNAKEMAKE).with_name("remerge")), "merge", str(recipe), str(ref)],
                         cwd=work, capture_output=True, text=True, env=offline_env())
    assert cli.returncode == 0, cli.stderr
    from remerge.hub.manifest import hash_file

    for case in REPAIRED:
        manifest = json.loads((results / "models" / f"bad_{case}" / "manifest.json").read_text())
        for entry in manifest["files"]:
            actual = bad / case / entry["path"]
            assert (entry["size"], entry["sha256"]) == (actual.stat().st_size, hash_file(actual)), (case, entry)
        prov = json.loads((results / case / "single" / "provenance.json").read_text())
        [record] = [i for i in prov["inputs"] if i["reference"] == f"../inputs/bad/{case}"]
        assert record["files"] == manifest["files"]
        model = results / case / "single" / "model"
        shards = sorted(p.name for p in model.glob("*.safetensors"))
        assert shards == sorted(p.name for p in ref.glob("*.safetensors")) and shards
        differing = 0
        for name in shards:
            differing += faults.bytes_differing((model / name).read_bytes(), (ref / name).read_bytes())
        FIGURES["bytes_differing"] += differing
        FIGURES["comparisons"].append({"comparison": f"bad input {case} repaired in place + rerun vs remerge merge",
                                       "files": len(shards), "bytes_differing": differing})
        assert differing == 0, case
    assert hidden_files(results) == []


# --- the cluster profile --------------------------------------------------------------------


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
