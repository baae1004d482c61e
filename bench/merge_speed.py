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
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_VENV_ROOT = Path.home() / ".cache" / "remerge-parity"
GENERATOR_VERSION = 1  # bump when the model generator changes: models are then rebuilt
INDEX_NAME = "model.safetensors.index.json"
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


# --- sizes --------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """`300M`, `1.5B`, `75000000`: K/M/B are powers of 1000 (mergekit's convention)."""
    text = str(text).strip()
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 300M, 1.5B)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def size_tag(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale and n % (scale // 1000 or 1) == 0:
            value = n / scale
            return f"{value:g}{unit}"
    return str(n)


# --- synthetic models ---------------------------------------------------------------------

# hidden, intermediate, attention heads, kv heads: a Llama-like width for each size band
WIDTHS = [
    (40e6, (256, 704, 4, 4)),
    (100e6, (512, 1408, 8, 8)),
    (225e6, (768, 2048, 12, 12)),
    (700e6, (1024, 2816, 16, 16)),
    (2.5e9, (2048, 5632, 16, 16)),
    (float("inf"), (4096, 14336, 32, 8)),
]
VOCAB = 32000


def llama_shape(params: int, vocab: int = VOCAB) -> dict:
    """A Llama config near `params` parameters: the width from the table, then the layer count."""
    hidden, inter, heads, kv_heads = next(w for limit, w in WIDTHS if params < limit)
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter + 2 * hidden
    outside = 2 * vocab * hidden + hidden  # embed_tokens, lm_head (untied), final norm
    layers = max(1, round((params - outside) / per_layer))
    return {
        "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_hidden_layers": layers,
        "vocab_size": vocab, "parameters": outside + layers * per_layer,
    }


def tensor_shapes(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model in the order transformers saves them."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def llama_config(shape: dict, marker: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "head_dim": shape["head_dim"], "hidden_act": "silu",
        "hidden_size": shape["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": shape["intermediate_size"], "max_position_embeddings": 4096 + marker,
        "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": shape["num_attention_heads"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_key_value_heads": shape["num_key_value_heads"], "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.2", "use_cache": True, "vocab_size": shape["vocab_size"],
    }


ROLES = ("base", "ft_a", "ft_b", "ft_c")
DELTA_STD = 1e-3  # fine-tune noise on weight matrices (bf16 ulp at |w| = 0.02 is 1.2e-4)
NORM_DELTA_STD = 2e-3  # on the norms (ulp near 1 is 7.8e-3: most stay exactly equal)
KEEP = 0.85  # share of entries a fine-tune changes at all; the rest are exact zeros


def _generator(seed: int, *parts: object):
    import torch

    digest = hashlib.sha256("\0".join(map(str, (seed, *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def base_tensor(seed: int, name: str, shape: tuple[int, ...]):
    import torch

    g = _generator(seed, "base", name)
    if len(shape) == 1:  # RMSNorm weights around 1
        values = 1.0 + 0.05 * torch.randn(shape, generator=g)
    else:
        values = 0.02 * torch.randn(shape, generator=g)
    return values.to(torch.bfloat16)


def finetune_tensor(seed: int, role: str, name: str, base):
    """base + delta, rounded to bf16. delta = a direction shared by all fine-tunes plus the
    model's own noise (so signs agree often but not always), zero on a random 15%."""
    import torch

    std = NORM_DELTA_STD if base.ndim == 1 else DELTA_STD
    common = torch.randn(base.shape, generator=_generator(seed, "common", name))
    own = torch.randn(base.shape, generator=_generator(seed, role, name))
    keep = torch.rand(base.shape, generator=_generator(seed, role, "keep", name)) < KEEP
    delta = (0.6 * common).add_(own, alpha=0.8).mul_(std).mul_(keep)
    return base.float().add_(delta).to(torch.bfloat16)


def _shard_cut(names_bytes: list[tuple[str, int]], shards: int) -> list[list[str]]:
    total = sum(b for _, b in names_bytes)
    cut: list[list[str]] = [[]]
    done = 0
    for name, nbytes in names_bytes:
        if cut[-1] and done >= total * len(cut) / shards and len(cut) < shards:
            cut.append([])
        cut[-1].append(name)
        done += nbytes
    return cut


def model_spec(seed: int, role: str, shape: dict, shards: int) -> dict:
    return {"generator": GENERATOR_VERSION, "seed": seed, "role": role, "shape": shape,
            "shards": shards, "delta_std": DELTA_STD, "norm_delta_std": NORM_DELTA_STD, "keep": KEEP}


SPEC_NAME = "remerge-bench.json"


def model_is_current(folder: Path, spec: dict) -> bool:
    try:
        have = json.loads((folder / SPEC_NAME).read_text())
    except (OSError, ValueError):
        return False
    if have.get("spec") != spec:
        return False
    return all((folder / f).is_file() and (folder / f).stat().st_size == size
               for f, size in have.get("files", {}).items())


def build_models(models_dir: Path, seed: int, shape: dict, shards: int) -> dict[str, Path]:
    """base, ft_a, ft_b, ft_c under models_dir (reused when their spec matches)."""
    import torch  # noqa: F401  (only the generator needs torch)
    from safetensors.torch import save_file

    folders = {}
    names = tensor_shapes(shape)
    cut = _shard_cut([(n, 2 * _numel(s)) for n, s in names], shards)
    shape_of = dict(names)
    for marker, role in enumerate(ROLES):
        folder = models_dir / role
        folders[role] = folder
        spec = model_spec(seed, role, shape, shards)
        if model_is_current(folder, spec):
            continue
        started = time.monotonic()
        print(f"[models] building {folder} ({shape['parameters'] / 1e6:.0f}M params, "
              f"{len(cut)} shards)", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        files = {}
        weight_map = {}
        total = 0
        for k, shard in enumerate(cut, 1):
            fname = f"model-{k:05d}-of-{len(cut):05d}.safetensors"
            tensors = {}
            for name in shard:
                t = base_tensor(seed, name, shape_of[name])
                if role != "base":
                    t = finetune_tensor(seed, role, name, t)
                tensors[name] = t
                weight_map[name] = fname
                total += t.numel() * 2
            save_file(tensors, str(folder / fname), metadata={"format": "pt"})
            del tensors
            files[fname] = (folder / fname).stat().st_size
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (folder / "config.json").write_text(json.dumps(llama_config(shape, marker), indent=2) + "\n")
        for f in (INDEX_NAME, "config.json"):
            files[f] = (folder / f).stat().st_size
        (folder / SPEC_NAME).write_text(json.dumps({"spec": spec, "files": files}, indent=2) + "\n")
        print(f"[models] {role}: {total / 1e6:.0f} MB in {time.monotonic() - started:.1f}s", flush=True)
    return folders


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- recipes ------------------------------------------------------------------------------


def recipe_text(kind: str, folders: dict[str, Path]) -> str:
    base, a, b, c = (str(folders[r]) for r in ROLES)
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
    raise SystemExit(f"unknown recipe {kind!r}: choose from seed, ties3")


RECIPE_MODELS = {"seed": ("base", "ft_a"), "ties3": ("base", "ft_a", "ft_b", "ft_c")}
RECIPE_NOTES = {"seed": {"0.1.5": "mergekit 0.1.5 refuses a model listed twice"}}


# --- the floor (runs in its own process: `merge_speed.py floor-worker ...`) ----------------


def floor_worker(argv: list[str]) -> int:
    """Read every tensor of every model with safe_open/get_tensor; write the first model's
    tensors (the base: the merge's output has the same names, shapes and dtypes) as
    safetensors shards cut at the same size, streamed, fsynced. No arithmetic."""
    ap = argparse.ArgumentParser(prog="merge_speed.py floor-worker")
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
        meta.update(_header(f))
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


# --- reading outputs ----------------------------------------------------------------------


def _header(path: Path) -> dict[str, tuple[str, list[int], tuple[int, int]]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], tuple(v["data_offsets"])) for k, v in header.items()}


def folder_tensors(folder: Path) -> dict[str, tuple[Path, str, list[int], int, int]]:
    """name -> (file, dtype, shape, absolute start, end) over every *.safetensors file."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        for name, (dtype, shape, (s, e)) in _header(f).items():
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


def warm_inputs(folders: list[Path]) -> None:
    """Read every input file once so that the first tool timed is not the only cold one."""
    for folder in folders:
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


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
    ap.add_argument("--recipes", default="seed,ties3", help="comma-separated: seed, ties3")
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
    args.recipe_list = [r.strip() for r in args.recipes.split(",") if r.strip()]
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


def build_worker(argv: list[str]) -> int:
    """`merge_speed.py build-models DIR SEED PARAMS SHARDS`: in its own process, so that this
    script never holds torch or model memory while it measures others."""
    folder, seed, params, shards = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    build_models(folder, seed, llama_shape(params), shards)
    return 0


def ensure_models(models_dir: Path, seed: int, params: int, shards: int) -> dict[str, Path]:
    shape = llama_shape(params)
    if not all(model_is_current(models_dir / r, model_spec(seed, r, shape, shards)) for r in ROLES):
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "build-models",
                        str(models_dir), str(seed), str(params), str(shards)], check=True)
    return {r: models_dir / r for r in ROLES}


def main(argv: list[str]) -> int:
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
                floor_cmd = [sys.executable, str(Path(__file__).resolve()), "floor-worker"]
                if args.out_shard_size:
                    floor_cmd += ["--out-shard-size", args.out_shard_size]
                if args.floor_no_fsync:
                    floor_cmd += ["--no-fsync"]
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
                if row["tool"].startswith("mergekit") and row["ok"] and not args.no_check:
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
