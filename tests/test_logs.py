"""A workflow job's log: a user's error ends it with one line, a bug with its traceback."""

import subprocess
import sys
from pathlib import Path

JOB = """\
import sys
from remerge.workflow.logs import to_file
from remerge.errors import ModelError
to_file(sys.argv[1])
import logging
logging.getLogger("remerge.job").info("started")
if sys.argv[2] == "user":
    raise ModelError("model folder /x/y has no config.json: give a finished merge")
raise KeyError("weight_map")
"""


def run_job(tmp_path: Path, kind: str) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / f"{kind}.log"
    proc = subprocess.run([sys.executable, "-c", JOB, str(log), kind], capture_output=True, text=True)
    return proc, log.read_text()


def test_a_users_error_is_one_line_in_the_log_and_on_the_terminal(tmp_path):
    proc, log = run_job(tmp_path, "user")
    assert proc.returncode == 1
    assert "Traceback" not in log and "started" in log
    assert log.splitlines()[-1].endswith("ERROR remerge: model folder /x/y has no config.json: give a finished merge")
    assert proc.stderr == "remerge: error: model folder /x/y has no config.json: give a finished merge\n"


def test_a_bug_keeps_its_traceback_in_the_log(tmp_path):
    proc, log = run_job(tmp_path, "bug")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in log and log.rstrip().endswith("KeyError: 'weight_map'")
    assert proc.stderr == ""
