#!/usr/bin/env python3
"""Merge speed: `remerge merge` vs `mergekit-yaml` vs the I/O floor, as whole processes.

    .venv/bin/python bench/merge_speed.py                       # 300M params, both recipes
    .venv/bin/python bench/merge_speed.py --params 75M,150M,300M --recipes seed \\
        --mergekit-venv ~/.cache/remerge-parity/venv-0.0.5.1 --repeat 3 --json sweep.json

1. Builds Llama-shaped synthetic bf16 models (a base and three fine-tunes = base + small
   correlated noise, with exact-zero deltas and ties in |delta|), in several input shards,
   deterministic from `--seed`, under `OUT/models/<size>/`; reused when already there.
2. Runs, each as a fresh process and timed from spawn to exit (wall time; peak RSS of the
   process tree from `wait4` and from polling /proc): `remerge merge`, `mergekit-yaml` from
   each side virtual environment (CPU), and the floor (a fresh Python process that reads every
   input tensor with `safe_open` and writes an output of the merge's size, no arithmetic).
3. Checks remerge's output against each mergekit's, tensor by tensor (names, dtypes, shapes,
   bytes), prints a table and optionally writes it as JSON (`--json`).

Timings are warm-cache by default (inputs read once beforehand, `sync` before every run);
`--cold` drops the page cache before every run (needs root). Nothing here imports remerge:
the script only runs its command line. See bench/README.md.

The models come from synthetic_models.py, the measuring (and the floor) from measure.py;
this file has the command line, the recipes, the runs, the bit-identity check and the output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

# bench/ is this script's directory, hence on sys.path
from measure import floor_command, floor_worker, measure, safetensors_header, warm_inputs
from synthetic_models import ROLES, build_worker, ensure_models, llama_shape, parse_size, size_tag

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_VENV_ROOT = Path.home() / ".cache" / "remerge-parity"
VENV_HELP = """\
mergekit side environment missing. To create them (outside this repo, never in .venv):
  python3.11 -m venv ~/.cache/remerge-parity/venv-0.0.5.1
  ~/.cache/remerge-parity/venv-0.0.5.1/bin/pip install torch==2.13.0 mergekit==0.0.5.1 "transformers<4.50" \\
      --extra-index-url https://download.pytorch.org/whl/cpu
  python3.11 -m venv ~/.cache/remerge-parity/venv-0.1.5
  ~/.cache/remerge-parity/venv-0.1.5/bin/pip install torch==2.13.0 mergekit==0.1.5 \\
      --extra-index-url https://download.pytorch.org/whl/cpu
(or `python3.11 tests/parity/make_goldens.py`, which creates both), then pass
--mergekit-venv PATH for each."""


# --- recipes ------------------------------------------------------------------------------


def recipe_text(kind: str, folders: dict[str, Path]) -> str:
    """The recipe `kind` over the model folders (those of RECIPE_MODELS[kind] are needed)."""
    base, a, b, c = (str(folders.get(r, "")) for r in ROLES)
    if kind == "seed":
        # the seed's recipe: one fine-tune listed twice, weight 1, density 1
        return f"""\
models:
  - model: {a}
    parameters:
      weight: 1
      density: 1
  - model: {a}
    parameters:
      weight: 1
      density: 1
merge_method: ties
base_model: {base}
parameters:
  density: 1
  normalize: true
  int8_mask: true
dtype: bfloat16
"""
    if kind == "ties3":
        return f"""\
models:
  - model: {a}
    parameters:
      weight: 0.5
      density: 0.5
  - model: {b}
    parameters:
      weight: 0.3
      density: 0.5
  - model: {c}
    parameters:
      weight: 0.2
      density: 0.5
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""
    if kind in METHOD_RECIPES:
        return method_recipe(kind, base, a, b, c)
    raise SystemExit(f"unknown recipe {kind!r}: choose from {', '.join(RECIPE_MODELS)}")


# One recipe per method of mergekit 0.1.5 beyond TIES: (models, per-model parameters,
# global parameters, with a base). Three fine-tunes where the method merges several.
METHOD_RECIPES = {
    "slerp": (1, [], "t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, "
              "{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]", True),
    "nuslerp": (2, ["weight: 0.4", "weight: 0.6"], "", True),
    "multislerp": (3, ["weight: 0.5", "weight: 0.3", "weight: 0.2"], "", True),
    "karcher": (3, [], "", False),
    "model_stock": (3, [], "", True),
    "sce": (3, [], "select_topk: 0.5", True),
    "della": (3, ["weight: 0.5, density: 0.5, epsilon: 0.1"] * 3, "lambda: 1.0", True),
    "della_linear": (3, ["weight: 0.5, density: 0.5, epsilon: 0.1"] * 3, "", True),
    "dare_ties": (3, ["weight: 0.5, density: 0.5"] * 3, "int8_mask: true", True),
    "nearswap": (1, [], "t: 0.001", True),
    "arcee_fusion": (1, [], "", True),
    "ram": (3, [], "epsilon: 0.001", True),
    "ramplus_tl": (3, [], "epsilon: 0.001", True),
    "passthrough": (1, [], "", False),
}
# Random methods: mergekit draws from one global generator, remerge per tensor, so their
# bytes are not compared (the statistics are tested in tests/test_random_methods.py).
RANDOM_RECIPES = {"della", "della_linear", "dare_ties", "arcee_fusion"}


def method_recipe(kind: str, base: str, *fine_tunes: str) -> str:
    count, per_model, shared, with_base = METHOD_RECIPES[kind]
    lines = ["models:"]
    for i, model in enumerate(fine_tunes[:count]):
        lines.append(f"  - model: {model}")
        if per_model:
            lines.append(f"    parameters: {{{per_model[i]}}}")
    lines.append(f"merge_method: {kind}")
    if with_base:
        lines.append(f"base_model: {base}")
    if shared:
        lines.append(f"parameters: {{{shared}}}")
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


RECIPE_MODELS = {"seed": ("base", "ft_a"), "ties3": ("base", "ft_a", "ft_b", "ft_c"),
                 **{kind: (("base",) if spec[3] else ()) + ("ft_a", "ft_b", "ft_c")[:spec[0]]
                    for kind, spec in METHOD_RECIPES.items()}}
NEW_IN_01 = "mergekit 0.0.5.1's version of this method is not one remerge follows"
RECIPE_NOTES = {"seed": {"0.1.5": "mergekit 0.1.5 refuses a model listed twice"},
                **{kind: {"0.0.5.1": NEW_IN_01} for kind in METHOD_RECIPES}}


# --- reading outputs ----------------------------------------------------------------------


def folder_tensors(folder: Path) -> dict[str, tuple[Path, str, list[int], int, int]]:
    """name -> (file, dtype, shape, absolute start, end) over every *.safetensors file."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        for name, (dtype, shape, (s, e)) in safetensors_header(f).items():
            out[name] = (f, dtype, shape, 8 + n + s, 8 + n + e)
    return out


def tensor_bytes(folder: Path) -> int:
    return sum(e - s for _, _, _, s, e in folder_tensors(folder).values())


def compare_folders(a: Path, b: Path) -> dict:
    """Tensor by tensor: names, dtypes, shapes and bytes (one tensor in memory at a time)."""
    ta, tb = folder_tensors(a), folder_tensors(b)
    problems = []
    only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
    if only_a:
        problems.append(f"only in {a.name}: {only_a[:3]}{'...' if len(only_a) > 3 else ''}")
    if only_b:
        problems.append(f"only in {b.name}: {only_b[:3]}{'...' if len(only_b) > 3 else ''}")
    differing = 0
    handles: dict[Path, object] = {}

    def read(entry):
        f, _, _, s, e = entry
        fh = handles.get(f) or handles.setdefault(f, open(f, "rb"))
        fh.seek(s)
        return fh.read(e - s)

    try:
        for name in sorted(set(ta) & set(tb)):
            (_, da, sa, _, _), (_, db, sb, _, _) = ta[name], tb[name]
            if (da, sa) != (db, sb):
                problems.append(f"{name}: {da}{sa} vs {db}{sb}")
                differing += 1
            elif read(ta[name]) != read(tb[name]):
                differing += 1
                if differing <= 3:
                    problems.append(f"{name}: bytes differ")
    finally:
        for fh in handles.values():
            fh.close()
    if differing > 3:
        problems.append(f"... {differing} tensors differ in all")
    files_a = {p.name: _sha256(p) for p in sorted(a.glob("*.safetensors"))}
    files_b = {p.name: _sha256(p) for p in sorted(b.glob("*.safetensors"))}
    # the other files (config.json, index, mergekit_config.yml, README.md), for information
    others = {}
    for f in sorted(p for p in b.iterdir() if p.is_file() and p.suffix != ".safetensors"):
        mine = a / f.name
        others[f.name] = ("missing" if not mine.is_file() else
                          "identical" if mine.read_bytes() == f.read_bytes() else "differs")
    return {
        "identical": not problems, "tensors": len(ta), "differing": differing + len(only_a) + len(only_b),
        "problems": problems, "shard_files_identical": files_a == files_b, "other_files": others,
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# --- runs -----------------------------------------------------------------------------------


def last_error(log_path: Path) -> str:
    lines = [l for l in Path(log_path).read_text(errors="replace").splitlines() if l.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line) or "error:" in line:
            return line.strip()[:200]
    return lines[-1].strip()[:200] if lines else "(no output)"


REMERGE_SEMANTICS = ("0.0.5.1", "0.1.5")  # `remerge merge --mergekit-version` choices


def semantics_of(mergekit: str) -> str:
    """Which remerge semantics to compare a mergekit version with ("auto": remerge's default)."""
    return mergekit if mergekit in REMERGE_SEMANTICS else "auto"


def mergekit_version(venv: Path) -> str | None:
    for info in sorted(venv.glob("lib/python*/site-packages/mergekit-*.dist-info")):
        m = re.match(r"mergekit-(.+)\.dist-info$", info.name)
        if m:
            return m.group(1)
    return None


def run_env(out: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONHASHSEED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false",
        HF_HOME=str(out / "hf-home"),
    )
    return env


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time remerge merge vs mergekit-yaml vs the I/O floor on synthetic Llama models.")
    ap.add_argument("--params", default="300M",
                    help="model size(s), comma-separated for a sweep, e.g. 75M,150M,300M (default 300M)")
    ap.add_argument("--shards", type=int, default=3, help="input shards per model (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic models (default 0)")
    ap.add_argument("--out", type=Path, default=HERE / "out",
                    help="models, outputs and logs (default bench/out, git-ignored)")
    ap.add_argument("--recipes", default="seed,ties3",
                    help="comma-separated: seed, ties3, or a method of mergekit 0.1.5 "
                    f"({', '.join(METHOD_RECIPES)}), or `methods` for all of those")
    ap.add_argument("--mergekit-venv", type=Path, action="append", default=None,
                    help="a virtual environment with mergekit-yaml (repeatable; default: "
                         "~/.cache/remerge-parity/venv-0.0.5.1 and venv-0.1.5 where present)")
    ap.add_argument("--no-mergekit", action="store_true", help="time remerge and the floor only")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor")
    ap.add_argument("--floor-no-fsync", action="store_true",
                    help="the floor skips fsync (remerge fsyncs each shard, mergekit does not)")
    ap.add_argument("--remerge", default=None,
                    help="the remerge executable (default: `remerge` next to this Python)")
    ap.add_argument("--threads", type=int, default=None, help="pass --threads N to remerge")
    ap.add_argument("--out-shard-size", default=None,
                    help="pass the same --out-shard-size to remerge and mergekit (default: "
                         "neither gets it, both use 5B)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool (median reported)")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before every run (root); default: warm cache")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each run, wait up to this many seconds for other processes to "
                         "leave the CPUs idle (<15%% busy over 1 s); 0: don't wait (default 60)")
    ap.add_argument("--no-check", action="store_true", help="skip the bit-identity check")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, run remerge once more under cProfile and print the top functions")
    ap.add_argument("--json", type=Path, default=None, help="write every measurement here")
    args = ap.parse_args(argv)
    args.sizes = [parse_size(p) for p in args.params.split(",") if p.strip()]
    args.recipe_list = [kind for r in args.recipes.split(",") if r.strip()
                        for kind in (METHOD_RECIPES if r.strip() == "methods" else [r.strip()])]
    for r in args.recipe_list:
        if r not in RECIPE_MODELS:
            ap.error(f"unknown recipe {r!r}: choose from {', '.join(RECIPE_MODELS)}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def find_mergekits(args) -> list[tuple[str, Path]]:
    if args.no_mergekit:
        return []
    venvs = args.mergekit_venv
    explicit = venvs is not None
    if venvs is None:
        venvs = [DEFAULT_VENV_ROOT / "venv-0.0.5.1", DEFAULT_VENV_ROOT / "venv-0.1.5"]
    found = []
    for venv in venvs:
        venv = venv.expanduser()
        exe = venv / "bin" / "mergekit-yaml"
        version = mergekit_version(venv)
        if exe.is_file() and version:
            found.append((version, exe))
        elif explicit:
            raise SystemExit(f"{venv}: no mergekit-yaml there.\n{VENV_HELP}")
    if not found:
        print(f"note: no mergekit found; timing remerge and the floor only.\n{VENV_HELP}", flush=True)
    return found


def main(argv: list[str]) -> int:
    # the workers' former entry points, still accepted (measure.py and synthetic_models.py
    # are what the benchmark itself runs now)
    if argv[:1] == ["floor-worker"]:
        return floor_worker(argv[1:])
    if argv[:1] == ["build-models"]:
        return build_worker(argv[1:])
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    remerge = args.remerge or str(Path(sys.executable).parent / "remerge")
    if not (shutil.which(remerge) or Path(remerge).is_file()):
        raise SystemExit(f"remerge executable not found: {remerge} (pass --remerge)")
    mergekits = find_mergekits(args)
    env = run_env(out)
    if args.cold and os.geteuid() != 0:
        raise SystemExit("--cold needs root (it writes /proc/sys/vm/drop_caches)")
    shard_opt = ["--out-shard-size", args.out_shard_size] if args.out_shard_size else []

    repo_at_start = repo_state()
    results = []
    sizes_info = {}
    for params in args.sizes:
        shape = llama_shape(params)
        tag = size_tag(params)
        sizes_info[tag] = shape
        folders = ensure_models(out / "models" / tag, args.seed, params, args.shards)
        for kind in args.recipe_list:
            rdir = out / "runs" / tag / kind
            rdir.mkdir(parents=True, exist_ok=True)
            recipe = rdir / f"{kind}.yml"
            recipe.write_text(recipe_text(kind, folders))
            inputs = [folders[r] for r in RECIPE_MODELS[kind]]
            if not args.cold:
                warm_inputs(inputs)
            # which mergekit versions to compare, and remerge following each one's semantics
            # (a mergekit that refuses the recipe gets no remerge run of its own; with none
            # left, remerge runs once with its default semantics, "auto")
            versions = [v for v in sorted({semantics_of(v) for v, _ in mergekits})
                        if not RECIPE_NOTES.get(kind, {}).get(v)] or ["auto"]
            threads = ["--threads", str(args.threads)] if args.threads else []
            tools: list[dict] = []
            for version in versions:
                semantics = [] if version == "auto" else ["--mergekit-version", version]
                tools.append({"tool": "remerge", "semantics": version,
                              "cmd": lambda d, s=semantics: [
                                  remerge, "merge", str(recipe), str(d), *s, *threads, *shard_opt]})
            for version, exe in mergekits:
                tools.append({"tool": f"mergekit {version}", "semantics": semantics_of(version),
                              "expect_refusal": RECIPE_NOTES.get(kind, {}).get(version),
                              "cmd": lambda d, e=exe: [str(e), str(recipe), str(d), *shard_opt]})
            if not args.no_floor:
                floor_cmd = floor_command(args.out_shard_size, args.floor_no_fsync)
                tools.append({"tool": "floor", "semantics": None,
                              "cmd": lambda d, c=floor_cmd: [*c, str(d), *map(str, inputs)]})
            samples: dict[int, list[dict]] = {i: [] for i in range(len(tools))}
            for rep in range(args.repeat):
                for i, tool in enumerate(tools):
                    if tool.get("expect_refusal") and rep > 0:
                        continue  # one refused run is enough
                    label = tool["tool"].replace(" ", "-") + (
                        f"__as-{tool['semantics']}" if tool["tool"] == "remerge" else "")
                    dest = rdir / label / f"{kind}-merge"  # the basename is mergekit's card title
                    shutil.rmtree(dest.parent, ignore_errors=True)
                    dest.parent.mkdir(parents=True)
                    m = measure(tool["cmd"](dest), out / "logs" / tag / kind / f"{label}__{rep + 1}.log",
                                env, args.cold, quiet_wait=args.quiet_wait)
                    m["out_dir"] = str(dest)
                    if tool["tool"] == "remerge":  # the engine may be edited while this runs
                        m["remerge_sources_sha256"] = repo_state()["remerge_sources_sha256"]
                    samples[i].append(m)
                    state = "ok" if m["rc"] == 0 else f"rc={m['rc']}: {last_error(Path(m['log']))}"
                    print(f"[{tag} {kind}] {tool['tool']:<16} {('(as ' + tool['semantics'] + ')') if tool['tool'] == 'remerge' else '':<12} "
                          f"run {rep + 1}/{args.repeat}: {m['wall_s']:6.2f}s wall, "
                          f"{m['peak_rss_bytes'] / 1e6:7.0f} MB peak RSS, {m['cpu_s']:6.1f}s CPU, "
                          f"others {m['others_cpu_s']:5.1f}s CPU  {state}",
                          flush=True)
            # summarize
            rows = []
            for i, tool in enumerate(tools):
                runs = samples[i]
                ok = [r for r in runs if r["rc"] == 0]
                row = {
                    "params": tag, "parameters": shape["parameters"], "recipe": kind,
                    "tool": tool["tool"], "semantics": tool["semantics"],
                    "ok": bool(ok) and len(ok) == len(runs),
                    "wall_s": median([r["wall_s"] for r in ok]) if ok else None,
                    "cpu_s": median([r["cpu_s"] for r in ok]) if ok else None,
                    "wall_min_s": min(r["wall_s"] for r in ok) if ok else None,
                    "others_cpu_s": median([r["others_cpu_s"] for r in ok]) if ok else None,
                    "peak_rss_mb": median([r["peak_rss_bytes"] for r in ok]) / 1e6 if ok else None,
                    "peak_anon_mb": median([r["peak_anon_polled_bytes"] for r in ok]) / 1e6 if ok else None,
                    "wall_all_s": [round(r["wall_s"], 3) for r in runs],
                    "runs": runs,
                }
                if not row["ok"]:
                    row["error"] = last_error(Path(runs[-1]["log"]))
                    if tool.get("expect_refusal"):
                        row["note"] = tool["expect_refusal"]
                if ok:
                    row["output_tensor_bytes"] = tensor_bytes(Path(ok[-1]["out_dir"]))
                rows.append(row)
            by = lambda name, sem=None: next((r for r in rows if r["tool"] == name and r["ok"] and (
                sem is None or r["semantics"] == sem)), None)  # noqa: E731
            floor = by("floor")
            for row in rows:
                # mergekit X vs remerge following X; the floor vs the first remerge row
                ref = by("remerge") if row["tool"] == "floor" else by("remerge", row["semantics"])
                row["x_remerge"] = (row["wall_s"] / ref["wall_s"]) if row["ok"] and ref else None
                row["x_floor"] = (row["wall_s"] / floor["wall_s"]) if row["ok"] and floor else None
                # the same ratios from each tool's fastest run (less sensitive to other load)
                row["x_remerge_min"] = (row["wall_min_s"] / ref["wall_min_s"]) if row["ok"] and ref else None
                row["x_floor_min"] = (row["wall_min_s"] / floor["wall_min_s"]) if row["ok"] and floor else None
                if row["tool"].startswith("mergekit") and kind in RANDOM_RECIPES:
                    row["note"] = "random method: bytes not compared"
                elif row["tool"].startswith("mergekit") and row["ok"] and not args.no_check:
                    mine = by("remerge", row["semantics"])
                    if mine:
                        row["check"] = compare_folders(Path(mine["runs"][-1]["out_dir"]),
                                                       Path(row["runs"][-1]["out_dir"]))
                        row["bit_identical"] = row["check"]["identical"]
            for row in rows:  # remerge: identical to every mergekit it was compared with
                if row["tool"] == "remerge":
                    checks = [r["bit_identical"] for r in rows if r["tool"].startswith("mergekit")
                              and r["semantics"] == row["semantics"] and "bit_identical" in r]
                    if checks:
                        row["bit_identical"] = all(checks)
            results.extend(rows)
            print_table(rows)

    print("\n== summary ==  ({} cache, {} run(s) per tool, median; {} CPU(s))".format(
        "cold" if args.cold else "warm", args.repeat, os.cpu_count()))
    print_table(results)
    engines = sorted({run["remerge_sources_sha256"] for r in results for run in r["runs"]
                      if "remerge_sources_sha256" in run} | {repo_at_start["remerge_sources_sha256"]})
    if len(engines) > 1:
        print(f"WARNING: remerge/ changed while this ran ({len(engines)} versions of its sources); "
              "the JSON records which runs used which (runs[].remerge_sources_sha256)")
    if args.profile:
        profile_remerge(args, out, remerge, env, shard_opt)
    if args.json:
        doc = {
            "format": "remerge.bench.merge_speed/1",
            "command": " ".join([Path(sys.executable).name, "bench/merge_speed.py", *argv]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "settings": {"cache": "cold" if args.cold else "warm", "repeat": args.repeat,
                         "threads": args.threads, "out_shard_size": args.out_shard_size or "5B (default)",
                         "floor_fsync": not args.floor_no_fsync, "seed": args.seed,
                         "quiet_wait_s": args.quiet_wait,
                         "input_shards": args.shards},
            "sizes": sizes_info,
            "repo": repo_at_start, "remerge_versions_seen": engines,
            "tools": {"remerge": remerge, **{f"mergekit {v}": str(e) for v, e in mergekits}},
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    failed = [r for r in results if r["tool"] == "remerge" and not r["ok"]]
    mismatched = [r for r in results if r.get("bit_identical") is False]
    return 1 if failed or mismatched else 0


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    head = (f"{'size':>5} {'recipe':<6} {'tool':<16} {'as':<8} {'wall s':>7} {'min s':>6} "
            f"{'peak RSS MB':>11} {'anon MB':>8} {'CPU s':>6} {'bg CPU':>6} {'x remerge':>9} "
            f"{'x floor':>7}  bit-identical")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        ident = {True: "yes", False: "NO"}.get(r.get("bit_identical"), "-")
        if not r["ok"]:
            print(f"{r['params']:>5} {r['recipe']:<6} {r['tool']:<16} {r['semantics'] or '':<8} "
                  f"{'refused' if r.get('note') else 'FAILED':>7}  {r.get('note') or r.get('error', '')}")
            continue
        if r.get("check") and not r["check"]["identical"]:
            ident += " (" + "; ".join(r["check"]["problems"][:2]) + ")"
        print(f"{r['params']:>5} {r['recipe']:<6} {r['tool']:<16} {r['semantics'] or '':<8} "
              f"{r['wall_s']:7.2f} {r['wall_min_s']:6.2f} {r['peak_rss_mb']:11.0f} {r['peak_anon_mb']:8.0f} "
              f"{r['cpu_s']:6.1f} {r['others_cpu_s']:6.1f} "
              f"{fmt(r['x_remerge'], '9.2f', '        -')} {fmt(r['x_floor'], '7.2f', '      -')}  {ident}")


def repo_state() -> dict:
    """Which engine was measured: HEAD, uncommitted changes, a digest of remerge/**/*.py."""
    def git(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    digest = hashlib.sha256()
    for f in sorted((REPO / "remerge").rglob("*.py")):
        digest.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    return {"head": git("rev-parse", "HEAD"), "remerge_dirty": bool(git("status", "--porcelain", "remerge")),
            "remerge_sources_sha256": digest.hexdigest()}


def machine_info() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                                 if l.startswith("model name"))
        info["mem_total_gb"] = round(int(next(l.split()[1] for l in open("/proc/meminfo")
                                              if l.startswith("MemTotal"))) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def profile_remerge(args, out: Path, remerge: str, env: dict, shard_opt: list[str]) -> None:
    """One more remerge run of each recipe (last size) under cProfile; prints the top functions."""
    for kind in args.recipe_list:
        _profile_one(args, out, remerge, env, shard_opt, kind)


def _profile_one(args, out: Path, remerge: str, env: dict, shard_opt: list[str], kind: str) -> None:
    tag = size_tag(args.sizes[-1])
    recipe = out / "runs" / tag / kind / f"{kind}.yml"
    dest = out / "profile" / tag / f"{kind}-merge"
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prof = dest.parent / f"remerge-{kind}.prof"
    python = str(Path(remerge).parent / "python")
    cmd = [python, "-m", "cProfile", "-o", str(prof), "-m", "remerge", "merge", str(recipe), str(dest)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    m = measure(cmd + shard_opt, dest.parent / f"remerge-{kind}.log", env, args.cold,
                quiet_wait=args.quiet_wait)
    print(f"\n== cProfile of remerge merge ({tag} {kind}): {m['wall_s']:.2f}s wall under the profiler ==")
    import pstats

    stats = pstats.Stats(str(prof))
    stats.sort_stats("tottime").print_stats(25)
    print(f"(full profile: {prof}; `python -m pstats {prof}`)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
