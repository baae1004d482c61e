"""Shared by the reliability tests (tests/test_reliability_*.py): fixtures and helpers.

Every test runs the real workflow (Snakemake in a subprocess) in folders of its own, next to
one shared `inputs/` folder that holds the input models (tests/configs/reliability*.yaml name
them as ../inputs/...). An interrupted run and the uninterrupted run it is compared with share
nothing but those inputs; where a result records the absolute path of its run folder (lm-eval's
results.json), the reference is run in the same folder first and then moved aside.

The fault families have a module each: kill -9 and resume (test_reliability_kill.py),
determinism (test_reliability_determinism.py), resources (test_reliability_resources.py), bad
inputs (test_reliability_bad_inputs.py) and the cluster profile (test_reliability_cluster.py).
This module is a pytest plugin (tests/conftest.py names it in `pytest_plugins`), so that its
fixtures are session-scoped across those modules: the shared folder, the reference run and the
--cores runs are built once per session, however many of the modules run.

The figures (faults injected, bad inputs tried, bytes that differed afterwards, declared and
measured memory) of all the modules that ran are written to `reliability.json` in pytest's
temporary folder and printed once, at the end of the session.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

import faults
from conftest import ROOT, SNAKEMAKE, offline_env, snakemake
from tinymodels import finetune, random_tensors, write_model

CONFIGS = ROOT / "tests" / "configs"
CONFIG = CONFIGS / "reliability.yaml"
EVAL_CONFIG = CONFIGS / "reliability_eval.yaml"
POINTS = ["density~0.5"]
SHARDS = [f"model-{i:05d}-of-00003" for i in (1, 2, 3)]
TIME_KEYS = {"results.json": ["date"]}  # lm-eval's wall-clock time of the evaluation

FIGURES: dict = {"faults_injected": 0, "faults": [], "bad_inputs_tried": 0, "bad_inputs": [],
                 "bytes_differing": 0, "comparisons": [], "memory": [], "time_dependent": []}


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def figures(request, tmp_path_factory):
    """FIGURES, written to reliability.json and summed up in one line when the session ends."""
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
def reliability_module(figures):
    """Used by every reliability module (`pytestmark`): the session's figures, and the runs that
    a failed test of the module left behind (a paused job never ends) killed at its end."""
    yield figures
    faults.Workflow.kill_leftovers()


@pytest.fixture(scope="session")
def space(tmp_path_factory) -> Path:
    """The session's folder: inputs/ (shared, read only) and one folder per run."""
    root = tmp_path_factory.mktemp("reliability")
    base = random_tensors(0)
    write_model(root / "inputs" / "base", base, shards=3)
    write_model(root / "inputs" / "a", finetune(base, 1))
    write_model(root / "inputs" / "b", finetune(base, 2), shards=2)
    return root


@pytest.fixture(scope="session")
def reference(space) -> Path:
    """The uninterrupted run of tests/configs/reliability.yaml that the others must equal."""
    work = space / "reference"
    proc = snakemake(work, "--cores", "2", config=CONFIG, check=True)
    (work / "snakemake.out").write_text(proc.stdout + proc.stderr)
    return work


@pytest.fixture(scope="session")
def demo_inputs(space) -> Path:
    from remerge.demo.models import build_demo_models

    build_demo_models(space / "inputs" / "demo", seed=0)
    return space / "inputs" / "demo"


@pytest.fixture(scope="session")
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
