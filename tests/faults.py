"""Fault injection for the reliability tests: real Snakemake runs killed with SIGKILL.

A run is started in its own process group (`Workflow`) and killed whole
(`Workflow.kill`: SIGKILL to the group, as a power cut or `kill -9` of the session would) or
one job alone (`kill_job`: as the kernel's OOM killer does).

To kill *inside* a given step rather than at a random moment, the jobs of a run can be
given a pause point: `pause_env()` puts a `sitecustomize.py` on the jobs' PYTHONPATH that,
in the job script of one rule only, wraps one function so that the first job to reach it
writes a marker file (`<fault dir>/paused-<pid>`) and sleeps until killed. Nothing else
changes: the job computes and writes exactly what it would have, up to that point.

    point                         the job stops ...
    merge_shard:write             after the first tensor of a shard was written to its
                                  temporary file (a half-written shard on disk)
    assemble_model:index          after tensors.json and mergekit_config.yml, before the index
    evaluate_model:scores         after eval/results.json, before scores.json

One more point only observes: `merge_shard:record` makes every merge_shard job write
`<fault dir>/record-<pid>.json` when it ends: its start and end on the system-wide monotonic
clock, OMP_NUM_THREADS and torch's thread count (what the job really ran with).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent

POINTS = ("merge_shard:write", "assemble_model:index", "evaluate_model:scores", "merge_shard:record")

_SITECUSTOMIZE = f"""\
import sys
sys.path.insert(0, {str(HERE)!r})
import faults
faults.install()
"""


# --- inside the job processes ---------------------------------------------------------------


def _pause(what: str) -> None:
    """The first process to get here writes the marker and sleeps until it is killed."""
    marker = Path(os.environ["REMERGE_FAULT_DIR"], f"paused-{os.getpid()}")
    try:
        fd = os.open(Path(os.environ["REMERGE_FAULT_DIR"], "claimed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # another job paused already: this one runs through
    os.close(fd)
    marker.write_text(f"{os.getpid()} {what}\n")
    while True:
        time.sleep(60)


def install() -> None:
    """Called from the generated sitecustomize.py in every Python process of a run."""
    point = os.environ.get("REMERGE_FAULT")
    if not point:
        return
    rule, where = point.split(":")
    script = sys.argv[0] if sys.argv else ""
    if not script.endswith(f".{rule}.py"):  # Snakemake names job scripts tmpXXXX.<rule>.py
        return
    if where == "record":
        started = time.monotonic_ns()

        def record() -> None:
            import torch

            Path(os.environ["REMERGE_FAULT_DIR"], f"record-{os.getpid()}.json").write_text(json.dumps({
                "start_ns": started, "end_ns": time.monotonic_ns(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "torch_threads": torch.get_num_threads(),
            }))

        atexit.register(record)
        return
    if where == "write":
        from remerge.io import safetensors as safetensors_io

        def pausing(original):
            def write(self, name, data, *piece):  # piece: write_raw's start element
                original(self, name, data, *piece)
                getattr(self, "wait", lambda: None)()  # the writer thread has it on disk
                handle = getattr(self, "_file", None)
                if handle is not None:  # the bytes so far on disk before pausing
                    handle.flush()
                    os.fsync(handle.fileno())
                _pause(f"{getattr(self, 'tmp', '?')} after {name}")

            return write

        # the merge hands a shard its tensors as tensors (`write`) or as bytes (`write_raw`)
        for method in ("write", "write_raw"):
            if hasattr(safetensors_io.ShardWriter, method):
                setattr(safetensors_io.ShardWriter, method, pausing(getattr(safetensors_io.ShardWriter, method)))
        return
    suffix = {"index": "model.safetensors.index.json", "scores": "scores.json"}[where]
    # Every atomic write of a small file ends in remerge.io.files.write_bytes_atomic (the text
    # and JSON writers call it); wrap it there and wherever a module bound it by name.
    from remerge.io import files

    original_fn = files.write_bytes_atomic

    def wrapped(path, *args, **kwargs):
        if str(path).endswith(suffix):
            _pause(f"before {path}")
        return original_fn(path, *args, **kwargs)

    files.write_bytes_atomic = wrapped
    import remerge.stages  # noqa: F401  (the modules the jobs use, imported before the sweep)
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("remerge") and \
                getattr(module, "write_bytes_atomic", None) is original_fn:
            module.write_bytes_atomic = wrapped


# --- in the test process --------------------------------------------------------------------


def pause_env(fault_dir: Path, point: str) -> dict[str, str]:
    """Environment entries that make the run's `point` pause (see the module docstring)."""
    assert point in POINTS, point
    fault_dir.mkdir(parents=True, exist_ok=True)
    hook = fault_dir / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    for old in [*fault_dir.glob("paused-*"), *fault_dir.glob("record-*")]:
        old.unlink()
    (fault_dir / "claimed").unlink(missing_ok=True)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "REMERGE_FAULT": point, "REMERGE_FAULT_DIR": str(fault_dir)}


def records(fault_dir: Path) -> list[dict]:
    """What `merge_shard:record` wrote, one entry per job, by start time."""
    found = [json.loads(p.read_text()) for p in fault_dir.glob("record-*.json")]
    return sorted(found, key=lambda r: r["start_ns"])


def paused_pid(fault_dir: Path) -> int | None:
    markers = sorted(fault_dir.glob("paused-*"))
    return int(markers[0].name.split("-")[1]) if markers else None


class Workflow:
    """One `snakemake` process (and its jobs) in a process group of its own."""

    started: list["Workflow"] = []

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path):
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        Workflow.started.append(self)

    @classmethod
    def kill_leftovers(cls) -> None:
        """Kill the groups of runs a failed test left behind (a paused job never ends)."""
        for run in cls.started:
            if run.proc.poll() is None or group_alive(run.proc.pid):
                run.kill()
        cls.started.clear()

    def wait_for(self, condition: Callable[[], object], timeout: float = 240, what: str = "") -> object:
        """Poll `condition` every 20 ms until it holds; fail if the run ends or time is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended ({self.proc.returncode}) before {what}:\n"
                                     + self.output()[-4000:])
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"timed out waiting for {what}:\n" + self.output()[-4000:])

    def kill(self) -> None:
        """SIGKILL to the whole group: snakemake and every job; then check nobody survived."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._out.close()  # (idempotent)
        deadline = time.monotonic() + 10
        while group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(self.proc.pid), "processes of the killed run survived"

    def wait(self, timeout: float = 600) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
        self._out.close()
        return code

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_job(pid: int) -> None:
    """SIGKILL one job process: what the OOM killer does to a job over its memory."""
    os.kill(pid, signal.SIGKILL)


# --- comparing result trees -----------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too) by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def bytes_differing(a: bytes, b: bytes) -> int:
    """Bytes that differ position by position, plus the length difference."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return abs(len(a) - len(b))
    return sum(x != y for x, y in zip(a[:n], b[:n])) + abs(len(a) - len(b))


def compare_trees(got: dict[str, bytes], want: dict[str, bytes]) -> dict[str, object]:
    """Files missing, extra and differing, and the bytes that differ (a missing or extra
    file counts all its bytes)."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differing = sorted(p for p in set(got) & set(want) if got[p] != want[p])
    count = (sum(len(want[p]) for p in missing) + sum(len(got[p]) for p in extra)
             + sum(bytes_differing(got[p], want[p]) for p in differing))
    return {"files": len(want), "bytes": sum(map(len, want.values())), "missing": missing,
            "extra": extra, "differing": differing, "bytes_differing": count}
