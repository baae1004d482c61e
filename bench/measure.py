#!/usr/bin/env python3
"""Measuring a command as a whole fresh process, for bench/merge_speed.py.

`measure(cmd, ...)` runs `cmd` through a tiny launcher process that spawns it and `wait4`s
it: wall time from spawn to exit, user + system CPU time of the process tree, peak RSS (the
larger of `wait4`'s ru_maxrss and a /proc poll summing RSS over the tree) and peak anonymous
RSS, the CPU the rest of the machine used meanwhile. Before each run it can wait for the CPUs
to be idle, always `sync`s, and with `cold` drops the page cache (root).

The floor, the I/O-only baseline, runs as its own process too:

    python bench/measure.py floor-worker [--out-shard-size S] [--no-fsync] OUT MODEL...

Only the floor imports torch and safetensors. Nothing here imports remerge.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from synthetic_models import parse_size

REPO = Path(__file__).resolve().parent.parent  # measured commands run here


def floor_command(out_shard_size: str | None = None, no_fsync: bool = False) -> list[str]:
    """The floor's command line, less its OUT and MODEL... arguments."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "floor-worker"]
    if out_shard_size:
        cmd += ["--out-shard-size", out_shard_size]
    if no_fsync:
        cmd += ["--no-fsync"]
    return cmd


# --- the floor (runs in its own process: `measure.py floor-worker ...`) ---------------------


def floor_worker(argv: list[str]) -> int:
    """Read every tensor of every model with safe_open/get_tensor; write the first model's
    tensors (the base: the merge's output has the same names, shapes and dtypes) as
    safetensors shards cut at the same size, streamed, fsynced. No arithmetic."""
    ap = argparse.ArgumentParser(prog="measure.py floor-worker")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--out-shard-size", type=parse_size, default=parse_size("5B"))
    ap.add_argument("--no-fsync", action="store_true")
    args = ap.parse_args(argv)

    import torch  # noqa: F401
    from safetensors import safe_open

    handles = []  # per model: name -> open handle
    for folder in args.models:
        files = sorted(folder.glob("*.safetensors"))
        by_name = {}
        for f in files:
            h = safe_open(str(f), framework="pt", device="cpu")
            for name in h.keys():
                by_name[name] = h
        handles.append(by_name)
    base = handles[0]
    names = sorted(base)
    # shapes/dtypes of the output from the base's headers (read without loading)
    meta = {}
    for f in sorted(args.models[0].glob("*.safetensors")):
        meta.update(safetensors_header(f))
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = meta[name][2][1] - meta[name][2][0]
        if shards[-1] and size + nbytes > args.out_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for k, shard in enumerate(shards, 1):
        path = args.out_dir / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name in shard:
            dtype, shape, (start, end) = meta[name]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + end - start]}
            pos += end - start
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for name in shard:
                first = None
                for model in handles:  # every input's copy of this tensor is read
                    t = model[name].get_tensor(name)
                    first = t if first is None else first
                out.write(memoryview(first.contiguous().reshape(-1).view(torch.uint8).numpy()))
            out.flush()
            if not args.no_fsync:
                os.fsync(out.fileno())
    # tensors only some inputs have (none for these models) are read too
    for model in handles[1:]:
        for name in sorted(set(model) - set(base)):
            model[name].get_tensor(name)
    return 0



def safetensors_header(path: Path) -> dict[str, tuple[str, list[int], tuple[int, int]]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], tuple(v["data_offsets"])) for k, v in header.items()}


# --- running and measuring ------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to max_wait s) until other processes use under `threshold` of the machine's
    CPUs over one second; returns the last busy share seen (this machine may be shared)."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = _cpu_jiffies()
        time.sleep(1.0)
        b1, t1 = _cpu_jiffies()
        share = (b1 - b0) / max(1, t1 - t0)
        if share < threshold or time.monotonic() >= deadline:
            return share
        time.sleep(2.0)


# A tiny fresh process between this script and the measured command. ru_maxrss of a process
# starts at the RSS of whoever forked it (Linux carries the pre-exec high-water mark over
# exec), so the measured command must be forked by a small process, not by this one.
LAUNCHER = r"""
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
try:
    pid = os.posix_spawnp(cmd[0], cmd, os.environ)
except OSError as err:
    print(f"cannot start {cmd[0]}: {err}", flush=True)
    sys.exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"wall_s": wall, "maxrss_kib": ru.ru_maxrss, "utime": ru.ru_utime,
               "stime": ru.ru_stime, "rc": os.waitstatus_to_exitcode(status)}, f)
sys.exit(min(255, abs(os.waitstatus_to_exitcode(status))))
"""


def measure(cmd: list[str], log_path: Path, env: dict, cold: bool, interval: float = 0.05,
            quiet_wait: float = 0.0) -> dict:
    """Run `cmd` as a fresh process; wall time, CPU time, peak RSS of the process tree.

    Peak RSS: `wait4`'s ru_maxrss (the largest single process of the tree, children that were
    waited for included), taken by a small launcher process that forks the command, and a
    /proc poll every `interval` s summing RSS (and anonymous RSS, i.e. without file pages such
    as mmapped inputs) over the command and all its descendants.
    """
    import psutil

    busy_before = wait_quiet(quiet_wait) if quiet_wait > 0 else None
    os.sync()  # earlier runs' dirty pages are not flushed on this run's clock
    if cold:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    peak = {"rss": 0, "anon": 0}
    done = threading.Event()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        report = log_path.with_suffix(".rusage.json")
        report.unlink(missing_ok=True)
        jiffies0 = _cpu_jiffies()
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(report), *cmd],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

        def poll():
            try:
                launcher = psutil.Process(proc.pid)
            except psutil.Error:
                return
            while not done.is_set():
                try:
                    tree = launcher.children(recursive=True)  # the command and its children
                except psutil.Error:
                    break
                rss = anon = 0
                for p in tree:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        continue
                    anon += _status_kb(p.pid, "RssAnon:") * 1024
                peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
                done.wait(interval)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        proc.wait()
        outer_wall = time.perf_counter() - started
        jiffies1 = _cpu_jiffies()
        done.set()
        poller.join()
    try:
        usage = json.loads(report.read_text())
    except (OSError, ValueError):
        raise SystemExit(f"the launcher of {cmd[0]} reported nothing; see {log_path}") from None
    wall = usage["wall_s"]  # spawn to exit of the command itself (not the launcher)
    proc.returncode = usage["rc"]
    maxrss = usage["maxrss_kib"] * 1024  # KiB on Linux
    cpu = usage["utime"] + usage["stime"]
    machine_busy = (jiffies1[0] - jiffies0[0]) / os.sysconf("SC_CLK_TCK")
    return {
        "rc": proc.returncode, "wall_s": wall, "wall_with_launcher_s": outer_wall, "cpu_s": cpu,
        # CPU seconds the rest of the machine used meanwhile (other jobs, this script's poller):
        # a large value means the run shared the CPUs and its wall time is inflated
        "others_cpu_s": max(0.0, machine_busy - cpu), "busy_share_before": busy_before,
        "peak_rss_bytes": max(maxrss, peak["rss"]), "maxrss_wait4_bytes": maxrss,
        "peak_rss_polled_bytes": peak["rss"], "peak_anon_polled_bytes": peak["anon"],
        "log": str(log_path),
    }



def warm_inputs(folders: list[Path]) -> None:
    """Read every input file once so that the first tool timed is not the only cold one."""
    for folder in folders:
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass



def main(argv: list[str]) -> int:
    if argv[:1] == ["floor-worker"]:
        return floor_worker(argv[1:])
    print("usage: measure.py floor-worker [--out-shard-size S] [--no-fsync] OUT MODEL...",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
