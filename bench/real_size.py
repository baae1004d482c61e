#!/usr/bin/env python3
"""The seed recipe at a real model's size: `remerge merge` vs the I/O floor vs mergekit 0.0.5.1.

    sudo .venv/bin/python bench/real_size.py --json bench/out/real-8b.json

1. Builds a base and a fine-tune with Llama-3.1-8B's shapes (vocab 128256, hidden 4096, 32
   layers, intermediate 14336, 8 KV heads; bf16, 16 GB each, `--shards` input shards), streamed
   in blocks (synthetic_models.py build-real), under `OUT/models/<shape>/`; reused when there.
2. Runs, each as a whole fresh process with the page cache dropped first (`sync; echo 3 >
   /proc/sys/vm/drop_caches`: root), timed from spawn to exit with the peak RSS of its process
   tree (measure.py): the floor (a process that reads both inputs with `safe_open` and writes
   an output of the merge's size as safetensors shards, fsynced, no arithmetic), `remerge
   merge` on the seed's recipe, and once `mergekit-yaml` (0.0.5.1, which accepts the seed's
   duplicate model) from its side virtual environment.
3. Compares remerge's output with mergekit's: every tensor's dtype, shape and sha256, every
   shard file's sha256, the other files (JSON, card) for information. Outputs are hashed and
   deleted as soon as each run ends (two 16 GB outputs never sit on the disk at once).

Before each run the JSON records the machine's state (available memory, load, what else ran:
`others_cpu_s`). Nothing here imports remerge: the script runs its command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

# bench/ is this script's directory, hence on sys.path
from measure import floor_command, measure
from merge_speed import (
    DEFAULT_VENV_ROOT, VENV_HELP, folder_tensors, last_error, machine_info, mergekit_version,
    recipe_text, repo_state, run_env,
)
from synthetic_models import REAL_SHAPES, ensure_models, ensure_real, parse_size, real_shape

HERE = Path(__file__).resolve().parent
ROLES = ["base", "ft_a"]  # the seed's recipe merges one fine-tune (listed twice) onto the base
BLOCK = 1 << 24


# --- what an output holds -----------------------------------------------------------------


def digests(folder: Path) -> dict:
    """sha256 of every tensor (with dtype and shape) and of every file, in one read per file."""
    tensors = folder_tensors(folder)
    by_file: dict[Path, list[tuple[int, int, str]]] = {}
    for name, (f, _, _, start, end) in tensors.items():
        by_file.setdefault(f, []).append((start, end, name))
    hashes = {name: hashlib.sha256() for name in tensors}
    files = {}
    for f, spans in sorted(by_file.items()):
        spans.sort()
        whole = hashlib.sha256()
        pos, k = 0, 0
        with open(f, "rb") as fh:
            while block := fh.read(BLOCK):
                whole.update(block)
                end_pos = pos + len(block)
                while k < len(spans) and spans[k][0] < end_pos:  # tensors overlapping this block
                    start, end, name = spans[k]
                    lo, hi = max(start, pos), min(end, end_pos)
                    if hi > lo:
                        hashes[name].update(memoryview(block)[lo - pos:hi - pos])
                    if end <= end_pos:
                        k += 1
                    else:
                        break
                pos = end_pos
        files[f.name] = whole.hexdigest()
    others = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".safetensors"}
    return {"tensors": {name: [tensors[name][1], tensors[name][2], hashes[name].hexdigest()]
                        for name in sorted(tensors)},
            "shard_files": files, "other_files": others}


def compare(mine: dict, theirs: dict) -> dict:
    a, b = mine["tensors"], theirs["tensors"]
    differing = sorted(n for n in set(a) & set(b) if a[n] != b[n])
    return {
        "identical": not differing and set(a) == set(b), "tensors": len(a),
        "differing": differing[:10], "only_remerge": sorted(set(a) - set(b))[:10],
        "only_mergekit": sorted(set(b) - set(a))[:10],
        "shard_files_identical": mine["shard_files"] == theirs["shard_files"],
        "other_files": {name: ("identical" if mine["other_files"].get(name) == digest else
                               "missing" if name not in mine["other_files"] else "differs")
                        for name, digest in theirs["other_files"].items()},
    }


# --- the machine ----------------------------------------------------------------------------


def machine_state() -> dict:
    """What else the machine is doing: available memory, load average, free disk."""
    meminfo = {}
    for line in open("/proc/meminfo"):
        key, value = line.split(":", 1)
        meminfo[key] = int(value.split()[0]) * 1024
    free = shutil.disk_usage(HERE)
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mem_available_gb": round(meminfo["MemAvailable"] / 1e9, 2),
            "mem_total_gb": round(meminfo["MemTotal"] / 1e9, 2), "loadavg": list(os.getloadavg()),
            "disk_free_gb": round(free.free / 1e9, 1)}


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(REAL_SHAPES))
    ap.add_argument("--shards", type=int, default=4, help="input shards per model (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "out", help="default bench/out (git-ignored)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of remerge and of the floor, interleaved")
    ap.add_argument("--mergekit-venv", type=Path, default=DEFAULT_VENV_ROOT / "venv-0.0.5.1")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache before each run")
    ap.add_argument("--delete-models", action="store_true", help="delete the input models at the end")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.warm and os.geteuid() != 0:
        raise SystemExit("dropping the page cache needs root (or pass --warm)")
    out = args.out.resolve()
    remerge = str(Path(sys.executable).parent / "remerge")
    mergekit = args.mergekit_venv.expanduser() / "bin" / "mergekit-yaml"
    if not args.no_mergekit and not mergekit.is_file():
        raise SystemExit(f"{mergekit} not found.\n{VENV_HELP}")
    env = run_env(out)
    shape = real_shape(args.shape)
    folders = ensure_real(out / "models" / args.shape, args.seed, args.shape, args.shards, ROLES)
    rdir = out / "runs" / args.shape / "seed"
    rdir.mkdir(parents=True, exist_ok=True)
    recipe = rdir / "seed.yml"
    recipe.write_text(recipe_text("seed", folders))
    # remerge builds and checks its fused kernel once per machine (cached): not on the clock
    small = ensure_models(out / "models" / "warmup", args.seed, parse_size("20M"), 1)
    (rdir / "warmup.yml").write_text(recipe_text("seed", small))
    shutil.rmtree(rdir / "warmup", ignore_errors=True)
    measure([remerge, "merge", str(rdir / "warmup.yml"), str(rdir / "warmup")], rdir / "warmup.log", env, False)
    shutil.rmtree(rdir / "warmup", ignore_errors=True)

    tools = {"floor": lambda d: [*floor_command(), str(d), *(str(folders[r]) for r in ROLES)],
             "remerge": lambda d: [remerge, "merge", str(recipe), str(d), "--mergekit-version", "0.0.5.1"],
             "mergekit 0.0.5.1": lambda d: [str(mergekit), str(recipe), str(d)]}
    schedule = [t for _ in range(args.repeat) for t in ("floor", "remerge") if t != "floor" or not args.no_floor]
    if not args.no_mergekit:
        schedule.append("mergekit 0.0.5.1")  # once: it needs ~15 GB and ~10 minutes
    runs, outputs = [], {}
    for i, tool in enumerate(schedule, 1):
        dest = rdir / tool.replace(" ", "-") / "seed-merge"  # the basename is the card's title
        shutil.rmtree(dest.parent, ignore_errors=True)
        dest.parent.mkdir(parents=True)
        before = machine_state()
        m = measure(tools[tool](dest), out / "logs" / args.shape / f"{tool.replace(' ', '-')}__{i}.log",
                    env, cold=not args.warm)
        m.update(tool=tool, before=before, command=" ".join(tools[tool](dest)))
        if m["rc"] != 0:
            m["error"] = last_error(Path(m["log"]))
        elif tool != "floor":
            outputs[tool] = digests(dest)
        shutil.rmtree(dest.parent, ignore_errors=True)
        runs.append(m)
        print(f"[{args.shape}] {tool:<17} {m['wall_s']:7.1f} s wall, {m['peak_rss_bytes'] / 1e6:7.0f} MB peak RSS "
              f"({m['peak_anon_polled_bytes'] / 1e6:.0f} MB anon), {m['cpu_s']:6.1f} s CPU, others "
              f"{m['others_cpu_s']:5.1f} s CPU, {before['mem_available_gb']} GB available before"
              f"{'' if m['rc'] == 0 else '  FAILED: ' + m['error']}", flush=True)

    def best(tool):
        ok = [r for r in runs if r["tool"] == tool and r["rc"] == 0]
        return min(ok, key=lambda r: r["wall_s"]) if ok else None

    check = compare(outputs["remerge"], outputs["mergekit 0.0.5.1"]) if len(outputs) == 2 else None
    summary = {tool: {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_bytes"] / 1e6,
                      "peak_anon_mb": r["peak_anon_polled_bytes"] / 1e6, "cpu_s": r["cpu_s"]}
               for tool in tools if (r := best(tool))}
    if "remerge" in summary:
        for tool, row in summary.items():
            row["x_remerge"] = row["wall_s"] / summary["remerge"]["wall_s"]
            if "floor" in summary:
                row["x_floor"] = row["wall_s"] / summary["floor"]["wall_s"]
    print(json.dumps(summary, indent=1))
    if check is not None:
        print("bit-identical:", check["identical"], "| shard files identical:", check["shard_files_identical"],
              "| other files:", check["other_files"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "format": "remerge.bench.real_size/1",
            "command": " ".join([Path(sys.executable).name, "bench/real_size.py", *argv]),
            "machine": machine_info(), "repo": repo_state(), "shape": {"name": args.shape, **shape},
            "input_shards": args.shards, "cache": "warm" if args.warm else "cold (dropped before each run)",
            "mergekit": mergekit_version(args.mergekit_venv.expanduser()) if not args.no_mergekit else None,
            "summary": summary, "check": check, "runs": runs,
            "shard_files": {tool: o["shard_files"] for tool, o in outputs.items()},
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.delete_models:
        shutil.rmtree(out / "models" / args.shape, ignore_errors=True)
    failed = any(r["rc"] != 0 for r in runs if r["tool"] == "remerge")
    return 1 if failed or (check is not None and not check["identical"]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
