#!/usr/bin/env python3
"""The synthetic benchmark models of bench/merge_speed.py: Llama-shaped, bf16, deterministic.

A base and three fine-tunes (`ft_a`, `ft_b`, `ft_c` = base + small correlated noise, with
exact-zero deltas and ties in |delta|), each in several safetensors shards with
`model.safetensors.index.json` and `config.json`, built from a seed. A model folder also gets
`remerge-bench.json` (the generator spec and its files' sizes); `ensure_models` reuses a
folder whose spec matches and rebuilds it otherwise. The building runs in its own process

    python bench/synthetic_models.py build-models DIR SEED PARAMS SHARDS
    python bench/synthetic_models.py build-real DIR SEED SHAPE SHARDS ROLE...

so that the benchmark never holds torch or model memory while it measures others. torch
and safetensors are imported only there. Nothing here imports remerge.

`build-real` makes models of a real model's shapes (`REAL_SHAPES`, e.g. Llama-3.1-8B: 16 GB
per model in bf16) in blocks of rows, streamed to the files, so that building one needs
about a gigabyte of memory whatever its size (bench/real_size.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

GENERATOR_VERSION = 1  # bump when the model generator changes: models are then rebuilt
INDEX_NAME = "model.safetensors.index.json"


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


# --- real model shapes, streamed -----------------------------------------------------------

# The widths of real models (tensor_shapes and llama_config take these keys)
REAL_SHAPES = {
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 32,
                     "vocab_size": 128256},
    # the same vocabulary at a quarter of the width (untied here: 1.5B parameters, 3 GB)
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "num_hidden_layers": 16,
                     "vocab_size": 128256},
}
BLOCK_ELEMENTS = 1 << 24  # elements generated at once (64 MB of float32 per random draw)


def real_shape(name: str) -> dict:
    shape = dict(REAL_SHAPES[name])
    shape["parameters"] = sum(_numel(s) for _, s in tensor_shapes(shape))
    return shape


def _row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Row ranges of at most BLOCK_ELEMENTS elements (one range for a 1-D tensor)."""
    if len(shape) < 2:
        return [(0, shape[0])]
    step = max(1, BLOCK_ELEMENTS // _numel(shape[1:]))
    return [(r, min(shape[0], r + step)) for r in range(0, shape[0], step)]


def _header(names: list[str], shape_of: dict) -> bytes:
    """A safetensors header for bf16 tensors stored in this order, padded to 8 bytes."""
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        end = pos + 2 * _numel(shape_of[name])
        header[name] = {"dtype": "BF16", "shape": list(shape_of[name]), "data_offsets": [pos, end]}
        pos = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def build_real(models_dir: Path, seed: int, shape_name: str, shards: int, roles: list[str]) -> dict[str, Path]:
    """Models of `roles` (base, ft_a, ...) with a real model's shapes under models_dir, reused
    when their spec matches. Each tensor is generated in blocks of rows (the base's block,
    then each fine-tune's from it, as `finetune_tensor` makes them: the same statistics as
    build_models, other random values) and written as it comes, all roles at once."""
    import torch

    shape = real_shape(shape_name)
    names = tensor_shapes(shape)
    shape_of = dict(names)
    cut = _shard_cut([(n, 2 * _numel(s)) for n, s in names], shards)
    folders = {role: models_dir / role for role in roles}
    specs = {role: {**model_spec(seed, role, shape, shards), "real": shape_name, "block": BLOCK_ELEMENTS}
             for role in roles}
    todo = [role for role in roles if not model_is_current(folders[role], specs[role])]
    if not todo:
        return folders
    started = time.monotonic()
    print(f"[models] building {', '.join(todo)} ({shape_name}: {shape['parameters'] / 1e9:.2f}B params, "
          f"{len(cut)} shards) under {models_dir}", flush=True)
    for role in todo:
        shutil.rmtree(folders[role], ignore_errors=True)
        folders[role].mkdir(parents=True)
    weight_map = {}
    for k, shard in enumerate(cut, 1):
        fname = f"model-{k:05d}-of-{len(cut):05d}.safetensors"
        order = sorted(shard)
        files = {role: open(folders[role] / fname, "wb") for role in todo}
        try:
            for f in files.values():
                f.write(_header(order, shape_of))
            for name in order:
                weight_map[name] = fname
                full = shape_of[name]
                for r0, r1 in _row_blocks(full):
                    key = f"{name}[{r0}:{r1}]"
                    base = base_tensor(seed, key, (r1 - r0, *full[1:]))
                    for role, f in files.items():
                        t = base if role == "base" else finetune_tensor(seed, role, key, base)
                        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        finally:
            for f in files.values():
                f.close()
        print(f"[models] shard {k}/{len(cut)} in {time.monotonic() - started:.0f}s", flush=True)
    total = sum(2 * _numel(s) for _, s in names)
    for marker, role in enumerate(ROLES):
        if role not in todo:
            continue
        folder = folders[role]
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (folder / "config.json").write_text(json.dumps(llama_config(shape, marker), indent=2) + "\n")
        sizes = {f.name: f.stat().st_size for f in sorted(folder.iterdir())}
        (folder / SPEC_NAME).write_text(json.dumps({"spec": specs[role], "files": sizes}, indent=2) + "\n")
    print(f"[models] {', '.join(todo)}: {total / 1e9:.1f} GB each in {time.monotonic() - started:.0f}s", flush=True)
    return folders


def ensure_real(models_dir: Path, seed: int, shape_name: str, shards: int, roles: list[str]) -> dict[str, Path]:
    """`build_real` in a fresh process (this one holds no torch or model memory)."""
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "build-real", str(models_dir),
                    str(seed), shape_name, str(shards), *roles], check=True)
    return {role: models_dir / role for role in roles}


# --- building in a process of its own -------------------------------------------------------


def build_worker(argv: list[str]) -> int:
    """`synthetic_models.py build-models DIR SEED PARAMS SHARDS`: in its own process, so that
    the benchmark never holds torch or model memory while it measures others."""
    folder, seed, params, shards = Path(argv[0]), int(argv[1]), parse_size(argv[2]), int(argv[3])
    build_models(folder, seed, llama_shape(params), shards)
    return 0


def ensure_models(models_dir: Path, seed: int, params: int, shards: int) -> dict[str, Path]:
    """base, ft_a, ft_b, ft_c under models_dir: built (in a fresh process) unless current."""
    shape = llama_shape(params)
    if not all(model_is_current(models_dir / r, model_spec(seed, r, shape, shards)) for r in ROLES):
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "build-models",
                        str(models_dir), str(seed), str(params), str(shards)], check=True)
    return {r: models_dir / r for r in ROLES}


def main(argv: list[str]) -> int:
    if argv[:1] == ["build-models"] and len(argv) == 5:
        return build_worker(argv[1:])
    if argv[:1] == ["build-real"] and len(argv) >= 6:
        build_real(Path(argv[1]), int(argv[2]), argv[3], int(argv[4]), argv[5:])
        return 0
    print("usage: synthetic_models.py build-models DIR SEED PARAMS SHARDS\n"
          "       synthetic_models.py build-real DIR SEED SHAPE SHARDS ROLE...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
