#!/usr/bin/env python3.11
"""Regenerate the mergekit parity goldens under tests/parity/.

What it does, in order (each step is idempotent: rerunning gives the same bytes):

1. Side virtual environments OUTSIDE the repo, one per reference version
   (default ``~/.cache/remerge-parity/venv-<version>``; ``--venv-root`` moves them):
   ``python3.11 -m venv`` + ``pip install torch==2.13.0 mergekit==<version>`` with the pins of
   ``VERSIONS`` (0.1.5, 0.0.5.1, 0.0.5, 0.0.6, 0.1.4), with a constraints file that
   pins torch to 2.13.0 (the local CPU wheel), so pip never pulls another torch.
   An existing venv with the right versions is reused.
2. The small input models under ``models/`` (Llama-shaped, built from seeded Python
   ``random`` streams, so they are byte-identical on every run), built with the
   0.1.5 venv's torch/safetensors/tokenizers.
3. ``mergekit-yaml recipes/<recipe>.yml <tmp>/<recipe> [options]`` on CPU for every recipe
   and every version, with cwd = tests/parity and the environment below; the output
   folder is then copied to ``goldens/<version>/<recipe>/`` (replacing what was there).
   A run that fails leaves only ``goldens/<version>/<recipe>/REFUSED.txt`` holding the
   final exception line of mergekit's traceback.
4. A tensor-by-tensor comparison of 0.0.5.1's and 0.1.5's outputs, printed as a table
   (NOTES.md quotes it).

Environment of every mergekit run: ``PYTHONHASHSEED=0``, ``HF_HUB_OFFLINE=1``,
``TRANSFORMERS_OFFLINE=1``, ``CUDA_VISIBLE_DEVICES=""``, ``HF_HOME=<venv-root>/hf-home``, and
the command is wrapped in ``setarch <machine> -R`` (no address-space randomization) where that
works. Why: mergekit orders the model-card bullets, and picks the config/tokenizer donor of a
merge without ``base_model``, from a Python ``set`` of pydantic models whose hash includes
``hash(None)``, which CPython 3.11 derives from an address. Without both, those two things
change from run to run (the tensors never do).

Usage (from anywhere; needs python3.11 and pip access to PyPI; takes ~10 minutes):

    python3.11 tests/parity/make_goldens.py                    # everything
    python3.11 tests/parity/make_goldens.py --only ties_d05_two_models --only linear_bf16_normalize
    python3.11 tests/parity/make_goldens.py --versions 0.1.5   # one reference version
    python3.11 tests/parity/make_goldens.py --models-only      # rebuild models/ only
    python3.11 tests/parity/make_goldens.py --compare-only     # just print the comparison

Not run by CI. Never install these packages into the project's own .venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = HERE / "recipes"
MODELS = HERE / "models"
GOLDENS = HERE / "goldens"

TORCH_PIN = "torch==2.13.0"
# one side venv per release with a verified record (remerge/merge/releases.py); the pins are
# those the goldens were made with (tests/parity/README.md, "Releases"):
VERSIONS = {
    "0.1.5": [TORCH_PIN, "mergekit==0.1.5"],
    "0.0.5.1": [TORCH_PIN, "mergekit==0.0.5.1", "transformers<4.50"],
    # 0.0.5 pins accelerate~=0.30.1, which a newer peft cannot import from
    "0.0.5": [TORCH_PIN, "mergekit==0.0.5", "transformers<4.50", "peft==0.12.0"],
    "0.0.6": [TORCH_PIN, "mergekit==0.0.6", "transformers<4.50"],
    # 0.1.4 predates transformers 5; the 4.57 it resolves to decides its config.json
    "0.1.4": [TORCH_PIN, "mergekit==0.1.4", "transformers<5"],
}
# the two releases whose tensors step 4 compares (NOTES.md quotes the table)
COMPARED = ["0.0.5.1", "0.1.5"]

# Extra mergekit-yaml options per recipe; every other recipe runs with the defaults
# (CPU, --copy-tokenizer, model card, 5B shard size, no --allow-crimes, no --random-seed).
RECIPE_OPTIONS = {
    "ties_multishard_2k": ["--out-shard-size", "2K"],
    # frankenmerges: the save order of tensors that read the same name decides the cut
    "slices_passthrough_frankenmerge_2k": ["--out-shard-size", "2K"],
    "slices_passthrough_deep_3k": ["--out-shard-size", "3K"],
    # random methods: seeded so that the goldens are repeatable (remerge seeds per tensor, so
    # it does not compare these bytes; they serve statistics tests)
    "della_seed_bf16": ["--random-seed", "42"],
    "della_seed_fp16": ["--random-seed", "42"],
    "della_linear_seed_fp32": ["--random-seed", "42"],
    "dare_ties_seed_bf16": ["--random-seed", "42"],
}


def single_stage_recipes() -> list:
    """The recipes mergekit-yaml runs: all but the multi-stage `multi_*.yml` ones, which
    make_multi_goldens.py runs with mergekit-multi (0.1.5 only)."""
    return sorted(p.stem for p in RECIPES.glob("*.yml") if not p.stem.startswith("multi_"))


# --------------------------------------------------------------------------------------
# the input models (built inside a venv: needs torch, safetensors, tokenizers)
# --------------------------------------------------------------------------------------

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 8, 24, 3, 4, 2, 50
HEAD_DIM = HIDDEN // HEADS

# name -> (values of, storage dtype, tied (no lm_head), shards, marker, extras)
# "values of" names the value stream (base or a fine-tune); the marker is added to 64 to
# give max_position_embeddings / model_max_length / max_length, so a copied file names
# its donor.
MODEL_SPECS = {
    "base": ("base", "bf16", False, 1, 0, ("tokenizer", "generation_config")),
    "ft_a": ("ft_a", "bf16", False, 2, 1, ("tokenizer", "generation_config")),
    "ft_b": ("ft_b", "bf16", False, 1, 2, ()),
    "ft_c": ("ft_c", "bf16", False, 1, 3, ()),
    "base_fp16": ("base", "fp16", False, 1, 10, ("tokenizer", "generation_config")),
    "ft_a_fp16": ("ft_a", "fp16", False, 1, 11, ()),
    "ft_b_fp16": ("ft_b", "fp16", False, 1, 12, ()),
    "base_fp32": ("base", "fp32", False, 1, 20, ("tokenizer", "generation_config")),
    "ft_a_fp32": ("ft_a", "fp32", False, 1, 21, ()),
    "ft_b_fp32": ("ft_b", "fp32", False, 1, 22, ()),
    "base_tied": ("base", "bf16", True, 1, 30, ("tokenizer", "generation_config")),
    "ft_a_tied": ("ft_a", "bf16", True, 1, 31, ()),
    "ft_b_tied": ("ft_b", "bf16", True, 1, 32, ()),
    "ft_badshape": ("ft_b", "bf16", False, 1, 40, ("badshape",)),
    "ft_missing": ("ft_b", "bf16", False, 1, 41, ("missing",)),
    # edge cases for the interpolating methods (slerp, nuslerp, multislerp, karcher, ...);
    # "neg" and "near" are derived from the base stream ("near" draws its own stream), so
    # adding them changes none of the models above
    "copy": ("base", "bf16", False, 1, 50, ()),  # every tensor = base's (parallel)
    "neg": ("neg", "bf16", False, 1, 51, ()),  # every tensor = -base (antipodal)
    "near": ("near", "bf16", False, 1, 52, ()),  # base + a tiny perturbation, see near_delta_values
    # Qwen2-shaped (q/k/v biases; config.json with `layer_types`, as transformers >= 4.53
    # writes it) for slices that change the layer count; bias values come from streams keyed
    # by their own names, so the models above do not change
    "qwen_a": ("ft_a", "bf16", False, 1, 60, ("qwen2", "tokenizer")),
    "qwen_b": ("ft_b", "bf16", False, 1, 61, ("qwen2",)),
}

# a tensor whose fine-tuned value is exactly the base value
IDENTICAL_TO_BASE = {
    "ft_a": "model.layers.1.self_attn.v_proj.weight",
    "ft_b": "model.layers.0.post_attention_layernorm.weight",
    "ft_c": "model.norm.weight",
}
BADSHAPE_TENSOR = "model.layers.0.self_attn.q_proj.weight"
MISSING_TENSOR = "model.layers.1.mlp.up_proj.weight"


def tensor_shapes(tied: bool, biases: bool = False) -> list:
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        if biases:  # Qwen2's attention biases
            shapes += [
                (p + "self_attn.q_proj.bias", (HEADS * HEAD_DIM,)),
                (p + "self_attn.k_proj.bias", (KV_HEADS * HEAD_DIM,)),
                (p + "self_attn.v_proj.bias", (KV_HEADS * HEAD_DIM,)),
            ]
        shapes += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        ]
    shapes.append(("model.norm.weight", (HIDDEN,)))
    if not tied:
        shapes.append(("lm_head.weight", (VOCAB, HIDDEN)))
    return shapes


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def base_values(name: str, shape) -> list:
    """float values (later rounded to bf16, then stored exactly in every variant)."""
    import random

    rnd = random.Random(f"remerge-parity/base/{name}")
    out = []
    for _ in range(_numel(shape)):
        if len(shape) == 1:  # norm weights near 1, on a 2^-5 grid
            out.append(1.0 + rnd.choice([-2, -1, 0, 0, 1, 2, 3]) * 2.0**-5)
        else:
            r = rnd.random()
            sign = rnd.choice([-1.0, 1.0])
            if r < 0.03:
                out.append(0.0)
            elif r < 0.13:  # tiny values: far below a fine-tune's value in exponent
                out.append(sign * rnd.uniform(2.0**-10, 2.0**-5))
            else:
                out.append(sign * rnd.uniform(0.0625, 1.0))
    return out


def delta_values(stream: str, name: str, shape) -> list:
    """Fine-tune deltas: many exact zeros, many ties on a 2^-6 grid, outliers, large
    continuous jumps (so that base + bf16(x - base) is not always x), small continuous values;
    signs drawn independently per model (so they conflict)."""
    import random

    if IDENTICAL_TO_BASE.get(stream) == name:
        return [0.0] * _numel(shape)
    rnd = random.Random(f"remerge-parity/{stream}/{name}")
    out = []
    for _ in range(_numel(shape)):
        r = rnd.random()
        s = rnd.choice([-1.0, 1.0])
        if r < 0.30:
            out.append(0.0)
        elif r < 0.80:
            out.append(s * rnd.choice([1, 1, 2, 2, 3, 4]) * 2.0**-6)
        elif r < 0.83:
            out.append(s * rnd.choice([0.25, 0.5]))
        elif r < 0.87:
            out.append(s * rnd.uniform(0.3, 1.0))
        else:
            out.append(s * rnd.uniform(0.0, 0.04))
    return out


def near_delta_values(name: str, shape) -> list:
    """The "near" model: base plus a perturbation so small that slerp's |cos| > 0.9995 lerp
    fallback triggers (1 - cos between 4e-6 and 1.2e-4), except in layer 1, where it is larger
    (1 - cos between 9e-4 and 5.5e-3: nearly parallel, but slerped with a tiny angle).
    Half of the elements move by +-k * 2^-8 (k in 1..3; layer 1: +-k * 2^-5)."""
    import random

    rnd = random.Random(f"remerge-parity/near/{name}")
    step = 2.0**-5 if name.startswith("model.layers.1.") else 2.0**-8
    out = []
    for _ in range(_numel(shape)):
        r = rnd.random()
        s = rnd.choice([-1.0, 1.0])
        k = rnd.choice([1, 2, 3])
        out.append(s * k * step if r < 0.5 else 0.0)
    return out


def model_config(spec_dtype: str, tied: bool, marker: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 64 + marker,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[
            spec_dtype
        ],
        "transformers_version": "4.45.2",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def qwen2_config(marker: int) -> dict:
    """A Qwen2 config.json of the same sizes, with the per-layer `layer_types` list."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "layer_types": ["full_attention"] * LAYERS,
        "max_position_embeddings": 64 + marker,
        "max_window_layers": LAYERS,
        "model_type": "qwen2",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    }


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer(folder: Path, marker: int) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i:02d}" for i in range(4, VOCAB)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    (folder / "tokenizer.json").write_text(
        tok.to_str(pretty=True) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    write_json(folder / "special_tokens_map.json", special)
    write_json(
        folder / "tokenizer_config.json",
        {
            **special,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 64 + marker,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )


def build_models(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    cache = {}

    def master(stream: str, name: str, shape):
        key = (stream, name)
        if key not in cache:
            base = torch.tensor(base_values(name, shape), dtype=torch.float32)
            base = base.to(torch.bfloat16).to(
                torch.float32
            )  # bf16 grid, exact everywhere
            if stream == "neg":
                base = -base
            elif stream == "near":
                base = base + torch.tensor(
                    near_delta_values(name, shape), dtype=torch.float32
                )
            elif stream != "base":
                base = base + torch.tensor(
                    delta_values(stream, name, shape), dtype=torch.float32
                )
            cache[key] = base.reshape(shape)
        return cache[key]

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for model, (stream, sdt, tied, shards, marker, extras) in MODEL_SPECS.items():
        folder = out / model
        folder.mkdir()
        tensors = {}
        for name, shape in tensor_shapes(tied, biases="qwen2" in extras):
            if "missing" in extras and name == MISSING_TENSOR:
                continue
            t = master(stream, name, shape).to(dtypes[sdt])
            if "badshape" in extras and name == BADSHAPE_TENSOR:
                t = t[: shape[0] // 2].clone()
            tensors[name] = t.contiguous()
        if shards == 1:
            save_file(
                tensors, str(folder / "model.safetensors"), metadata={"format": "pt"}
            )
        else:
            names = list(tensors)
            cut = names.index("model.layers.2.input_layernorm.weight")
            parts = [names[:cut], names[cut:]]
            weight_map, total = {}, 0
            for i, part in enumerate(parts):
                fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
                save_file(
                    {k: tensors[k] for k in part},
                    str(folder / fname),
                    metadata={"format": "pt"},
                )
                for k in part:
                    weight_map[k] = fname
                    total += tensors[k].numel() * tensors[k].element_size()
            write_json(
                folder / "model.safetensors.index.json",
                {
                    "metadata": {"total_size": total},
                    "weight_map": dict(sorted(weight_map.items())),
                },
            )
        config = qwen2_config(marker) if "qwen2" in extras else model_config(sdt, tied, marker)
        write_json(folder / "config.json", config)
        if "tokenizer" in extras:
            write_tokenizer(folder, marker)
        if "generation_config" in extras:
            write_json(
                folder / "generation_config.json",
                {"bos_token_id": 1, "eos_token_id": 2, "max_length": 64 + marker},
            )
    print(f"built {len(MODEL_SPECS)} models in {out}")


# --------------------------------------------------------------------------------------
# comparison of the two versions' outputs (run inside a venv)
# --------------------------------------------------------------------------------------


def load_folder(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def compare_goldens(versions: list) -> list:
    import torch

    rows = []
    a_ver, b_ver = versions
    recipes = single_stage_recipes()
    for recipe in recipes:
        a, b = GOLDENS / a_ver / recipe, GOLDENS / b_ver / recipe
        ra, rb = (a / "REFUSED.txt").exists(), (b / "REFUSED.txt").exists()
        row = {
            "recipe": recipe,
            a_ver: "refused" if ra else "ok",
            b_ver: "refused" if rb else "ok",
        }
        if not a.exists() or not b.exists():
            row["result"] = "missing"
        elif ra or rb:
            row["result"] = "n/a (refused)"
        else:
            ta, tb = load_folder(a), load_folder(b)
            diffs, total, differing_tensors, notes = 0, 0, [], []
            for name in sorted(set(ta) | set(tb)):
                if name not in ta or name not in tb:
                    notes.append(f"{name} only in {a_ver if name in ta else b_ver}")
                    continue
                x, y = ta[name], tb[name]
                if x.dtype != y.dtype or x.shape != y.shape:
                    notes.append(
                        f"{name}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
                    )
                    continue
                total += x.numel()
                ix = x.contiguous().view(
                    torch.int16 if x.element_size() == 2 else torch.int32
                )
                iy = y.contiguous().view(
                    torch.int16 if y.element_size() == 2 else torch.int32
                )
                n = int((ix != iy).sum())
                if n:
                    diffs += n
                    differing_tensors.append(f"{name}:{n}")
            row.update(
                result="identical" if not diffs and not notes else "differ",
                differing_elements=diffs,
                elements=total,
                differing_tensors=differing_tensors,
                notes=notes,
            )
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# orchestration (plain stdlib, runs on the system python3.11)
# --------------------------------------------------------------------------------------


def venv_python(root: Path, version: str) -> Path:
    return root / f"venv-{version}" / "bin" / "python"


def installed_versions(py: Path) -> dict:
    code = (
        "import importlib.metadata as m, json\n"
        "out = {}\n"
        "for p in ('torch', 'mergekit', 'transformers'):\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: out[p] = None\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def ensure_venv(root: Path, version: str, python: str) -> Path:
    py = venv_python(root, version)
    if py.exists():
        have = installed_versions(py)
        if have.get("mergekit") == version and (have.get("torch") or "").startswith(
            "2.13.0"
        ):
            return py
    print(f"[venv] creating {py.parent.parent} for mergekit {version}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "venv", "--clear", str(py.parent.parent)], check=True)
    constraints = root / "torch-constraint.txt"
    constraints.write_text(TORCH_PIN + "\n", encoding="utf-8")
    subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(constraints),
            *VERSIONS[version],
        ],
        check=True,
    )
    have = installed_versions(py)
    if have.get("mergekit") != version or not (have.get("torch") or "").startswith(
        "2.13.0"
    ):
        raise SystemExit(
            f"venv for {version} has {have}; expected mergekit {version}, torch 2.13.0"
        )
    return py


def run_env(root: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONHASHSEED="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        CUDA_VISIBLE_DEVICES="",
        HF_HOME=str(root / "hf-home"),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def no_aslr_prefix() -> list:
    """``setarch <machine> -R`` when it works here, else nothing (with a warning)."""
    exe = shutil.which("setarch")
    if exe:
        probe = subprocess.run(
            [exe, platform.machine(), "-R", "true"], capture_output=True
        )
        if probe.returncode == 0:
            return [exe, platform.machine(), "-R"]
    print(
        "warning: setarch -R unavailable; README bullet order and base-less donors may vary",
        flush=True,
    )
    return []


def exception_line(stderr: str) -> str:
    """The final exception line of the last traceback in stderr."""
    lines = stderr.splitlines()
    starts = [
        i
        for i, line in enumerate(lines)
        if line.startswith("Traceback (most recent call last):")
    ]
    if starts:
        for line in lines[starts[-1] + 1 :]:
            if line and not line.startswith(" "):
                return line
    nonblank = [line for line in lines if line.strip()]
    return nonblank[-1] if nonblank else "(no output)"


def run_recipe(
    root: Path, version: str, recipe: str, log_dir: Path, prefix: list, *,
    here: Path = HERE, options: list | None = None, tag: str | None = None,
) -> str:
    """`mergekit-yaml recipes/<recipe>.yml` of `version` in folder `here` (tests/parity, or a
    golden set of its own: arch/, tokenizer/), its output copied to `here/goldens/<version>/
    <recipe>/` (or REFUSED.txt with mergekit's last error line); "ok" or "refused: <line>"."""
    exe = venv_python(root, version).parent / "mergekit-yaml"
    dest = here / "goldens" / version / recipe
    with tempfile.TemporaryDirectory(prefix="remerge-parity-") as tmp:
        out = Path(tmp) / recipe  # the basename becomes the model card's title
        cmd = [
            str(exe),
            f"recipes/{recipe}.yml",
            str(out),
            *(RECIPE_OPTIONS.get(recipe, []) if options is None else options),
        ]
        res = subprocess.run(
            prefix + cmd, cwd=here, env=run_env(root), capture_output=True, text=True
        )
        (log_dir / f"{tag or version}__{recipe}.log").write_text(
            f"$ {' '.join(cmd)}\nrc={res.returncode}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}",
            encoding="utf-8",
        )
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if res.returncode != 0:
            dest.mkdir()
            (dest / "REFUSED.txt").write_text(
                exception_line(res.stderr) + "\n", encoding="utf-8"
            )
            return "refused: " + exception_line(res.stderr)
        shutil.copytree(out, dest)
        return "ok"


def print_comparison(rows: list, versions: list) -> None:
    a, b = versions
    print(f"\n| recipe | {a} | {b} | result | differing elements |")
    print("|---|---|---|---|---|")
    for r in rows:
        d = r.get("differing_elements")
        extra = f"{d} / {r['elements']}" if d is not None else ""
        notes = r.get("notes") or []
        if notes:
            extra += f" ({len(notes)} tensors differ in dtype/shape/presence, e.g. {notes[0]})"
        print(f"| {r['recipe']} | {r[a]} | {r[b]} | {r['result']} | {extra} |")
    for r in rows:
        if r.get("differing_tensors"):
            print(f"\n{r['recipe']}: " + ", ".join(r["differing_tensors"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--venv-root", type=Path, default=Path.home() / ".cache" / "remerge-parity"
    )
    ap.add_argument(
        "--python", default="python3.11", help="interpreter for the side venvs"
    )
    ap.add_argument(
        "--versions",
        default=",".join(VERSIONS),
        help="comma-separated mergekit versions",
    )
    ap.add_argument(
        "--only", action="append", default=[], help="recipe name (repeatable)"
    )
    ap.add_argument(
        "--models-only", action="store_true", help="rebuild models/ and stop"
    )
    ap.add_argument(
        "--compare-only",
        action="store_true",
        help="print the version comparison and stop",
    )
    ap.add_argument("--skip-models", action="store_true", help="keep models/ as it is")
    # internal: steps that run inside a venv
    ap.add_argument(
        "--_build-models", dest="build_models", type=Path, help=argparse.SUPPRESS
    )
    ap.add_argument(
        "--_compare", dest="compare", action="store_true", help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)

    if args.build_models:
        build_models(args.build_models)
        return 0
    if args.compare:
        print(json.dumps(compare_goldens(COMPARED)))
        return 0

    versions = [v for v in args.versions.split(",") if v]
    unknown = [v for v in versions if v not in VERSIONS]
    if unknown:
        ap.error(f"unknown version(s) {unknown}; known: {list(VERSIONS)}")
    root = args.venv_root.expanduser().resolve()
    first_py = ensure_venv(root, "0.1.5", args.python)  # builds models, compares

    if not args.compare_only:
        for v in versions:
            ensure_venv(root, v, args.python)
        if not args.skip_models:
            subprocess.run(
                [str(first_py), __file__, "--_build-models", str(MODELS)], check=True
            )
        if args.models_only:
            return 0
        recipes = single_stage_recipes()
        missing = [r for r in args.only if r not in recipes]
        if missing:
            ap.error(f"no recipe named {missing}")
        if not args.only:  # drop goldens of recipes that no longer exist
            for v in versions:
                for old in (
                    sorted((GOLDENS / v).glob("*")) if (GOLDENS / v).exists() else []
                ):
                    if old.is_dir() and old.name not in recipes and not old.name.startswith("multi_"):
                        shutil.rmtree(old)
                        print(f"[{v}] removed stale {old.name}")
        recipes = args.only or recipes
        log_dir = root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        prefix = no_aslr_prefix()
        for v in versions:
            for r in recipes:
                status = run_recipe(root, v, r, log_dir, prefix)
                print(f"[{v}] {r}: {status}", flush=True)
        print(f"logs in {log_dir}")

    res = subprocess.run(
        [str(first_py), __file__, "--_compare"],
        capture_output=True,
        text=True,
        check=True,
    )
    print_comparison(json.loads(res.stdout), COMPARED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
