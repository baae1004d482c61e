"""Shared fixtures: the repository root and a Snakemake runner for end-to-end tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# The reliability tests' session-scoped fixtures and figures (tests/reliability.py), shared by the
# tests/test_reliability_*.py modules.
pytest_plugins = ["reliability"]

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of every workflow run in the tests: nothing may reach the network."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def snakemake(workdir: Path, *args: str, config: Path | None = None, timeout: int = 900,
              check: bool = False) -> subprocess.CompletedProcess:
    """`snakemake` on the project's Snakefile, in `workdir` (its own results/ and .snakemake/)."""
    cmd = [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), *args]
    if config is not None:
        cmd += ["--configfile", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=offline_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture()
def root() -> Path:
    return ROOT


def jobs_of(dry_run_output: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run lists (checkpoints included)."""
    jobs = []
    for line in dry_run_output.splitlines():
        if m := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line):
            jobs.append((m.group(1), ""))
        elif jobs and (m := re.match(r"^\s+wildcards: (.*)", line)):
            jobs[-1] = (jobs[-1][0], m.group(1))
    return jobs
