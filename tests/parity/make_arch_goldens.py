#!/usr/bin/env python3.11
"""Regenerate the architecture parity goldens under tests/parity/arch/ (mergekit 0.1.5 only).

    python3.11 tests/parity/make_arch_goldens.py                 # models, recipes, goldens
    python3.11 tests/parity/make_arch_goldens.py --only llama_ties --skip-models

For each architecture of `ARCHS` (tiny: hidden 32, 3 layers, vocab 50) it builds, with the
side venv's transformers 5, a model of that class, saves it with `save_pretrained` (so the
tensor names, config.json and generation_config.json are what transformers writes for it),
then replaces every tensor by seeded values: a base and two fine-tunes (base + sparse seeded
deltas), all bf16. The base has the parity tokenizer. It writes one recipe per method
(`METHODS`) and runs mergekit 0.1.5 on each as make_goldens.py does (same environment, no
ASLR, cwd tests/parity/arch), keeping its output folder or REFUSED.txt.

Layout (its own folder, not models/ recipes/ goldens/ of make_goldens.py, whose runs rebuild
models/ from scratch and whose tests expect every recipe there to have goldens of every
release):

    arch/models/<arch>-{base,ft_a,ft_b}/     arch/recipes/<arch>_<method>.yml
    arch/goldens/0.1.5/<arch>_<method>/      (mergekit's output, or REFUSED.txt)

`mixtral` is stored as transformers saves it (experts one by one, `block_sparse_moe.`), which
mergekit 0.1.5 fuses while loading; `mixtral_fused` is stored in the fused layout transformers 5
holds in memory and mergekit writes (`mlp.experts.gate_up_proj`, ...); `mixtral_mixed` mixes
them: its base and ft_b are `mixtral`-style models converted to the fused layout, ft_a stays
per-expert.
Not run by CI. Needs the 0.1.5 side venv of make_goldens.py (created if missing).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import make_goldens as mg

HERE = Path(__file__).resolve().parent / "arch"
VERSION = "0.1.5"

# architecture -> (transformers config class, model class, extra config keys)
SIZES = dict(vocab_size=mg.VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
             pad_token_id=3)
ATTN = dict(num_key_value_heads=2, head_dim=8)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", ATTN),
    "mistral": ("MistralConfig", "MistralForCausalLM", ATTN),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", ATTN),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", ATTN),  # tied embeddings
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", ATTN),  # tied, q/k norms
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 2}),  # fused qkv, gate_up
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**ATTN, "num_local_experts": 2, "num_experts_per_tok": 1}),
    "mixtral_fused": ("MixtralConfig", "MixtralForCausalLM", {**ATTN, "num_local_experts": 2, "num_experts_per_tok": 1}),
    "mixtral_mixed": ("MixtralConfig", "MixtralForCausalLM", {**ATTN, "num_local_experts": 2, "num_experts_per_tok": 1}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),  # other names, biases
    # with the buffers older checkpoints (Pythia's) store and mergekit's definition requires
    "gpt_neox_buffers": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
}

# method -> recipe text ({m} is the model folder prefix); slerp's t has a gradient on the
# attention and a default, linear has a base_model only to fix the config donor
METHODS = {
    "ties": """\
models:
  - model: {m}-ft_a
    parameters: {{density: 0.5, weight: 0.6}}
  - model: {m}-ft_b
    parameters: {{density: 0.7, weight: 0.4}}
merge_method: ties
base_model: {m}-base
parameters: {{normalize: true}}
dtype: bfloat16
""",
    "slerp": """\
models:
  - model: {m}-base
  - model: {m}-ft_a
merge_method: slerp
base_model: {m}-base
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.8]
    - value: 0.4
dtype: bfloat16
""",
    "linear": """\
models:
  - model: {m}-base
    parameters: {{weight: 0.5}}
  - model: {m}-ft_a
    parameters: {{weight: 0.3}}
  - model: {m}-ft_b
    parameters: {{weight: 0.2}}
merge_method: linear
base_model: {m}-base
dtype: bfloat16
""",
    # layer 1 twice (the layer count stays 3, so config.json stays valid with `layer_types`),
    # one model (mergekit's config donor is then not drawn from a set); several shards, so the
    # save order of the tensors that read the same name shows
    "passthrough": """\
slices:
  - sources:
      - model: {m}-base
        layer_range: [0, 2]
  - sources:
      - model: {m}-base
        layer_range: [1, 2]
merge_method: passthrough
dtype: bfloat16
""",
}
OPTIONS = {"passthrough": ["--out-shard-size", "20K"]}  # per method
# architectures merged into several shards by every method: the save order of the experts shows
SHARDED = ("mixtral", "mixtral_mixed")


def recipes() -> dict[str, str]:
    """recipe name -> text, for every architecture and method."""
    return {f"{a}_{m}": text.format(m=f"./models/{a}") for a in ARCHS for m, text in METHODS.items()}


def options(recipe: str) -> list[str]:
    arch, method = recipe.rsplit("_", 1)
    return OPTIONS.get(method) or (["--out-shard-size", "20K"] if arch in SHARDED else [])


# --- the models (run inside the side venv) ----------------------------------------------------


def seeded(key: str, shape, scale: float):
    import zlib

    import torch

    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(shape, generator=g) * scale


def base_value(arch: str, name: str, shape):
    """Norm weights near 1, everything else small and centred; on the bf16 grid."""
    if len(shape) == 1 and "norm" in name:
        return (1.0 + seeded(f"{arch}/base/{name}", shape, 0.1)).bfloat16()
    return seeded(f"{arch}/base/{name}", shape, 0.2).bfloat16()


def fine_tune(arch: str, stream: str, name: str, base):
    """base + a delta that is 0 in 30% of the elements (seeded per model and tensor)."""
    import torch

    delta = seeded(f"{arch}/{stream}/{name}", base.shape, 0.03)
    keep = seeded(f"{arch}/{stream}/{name}/keep", base.shape, 1.0) > -0.52  # ~70%
    return (base.float() + torch.where(keep, delta, 0.0)).bfloat16()


def neox_buffers(config) -> dict:
    """Per layer, the buffers GPT-NeoX checkpoints used to store (equal in every model): the
    causal mask (bool [1, 1, P, P]), the masked value (float32 scalar) and the rotary inverse
    frequencies (float32 [rotary dims / 2])."""
    import torch

    p = config.max_position_embeddings
    rot = int(config.hidden_size // config.num_attention_heads * config.rope_parameters["partial_rotary_factor"])
    out = {}
    for i in range(config.num_hidden_layers):
        a = f"gpt_neox.layers.{i}.attention."
        out[a + "bias"] = torch.tril(torch.ones(p, p, dtype=torch.bool)).view(1, 1, p, p)
        out[a + "masked_bias"] = torch.tensor(-1e9)
        out[a + "rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    return out


def fuse_experts(tensors: dict) -> dict:
    """A per-expert Mixtral's tensors in the fused layout, as transformers 5 converts them:
    per layer `mlp.experts.gate_up_proj` = cat([stack(w1), stack(w3)], 1), `mlp.experts.down_proj`
    = stack(w2), `block_sparse_moe.` renamed `mlp.`."""
    import re

    import torch

    out, experts = {}, {}
    for name, t in tensors.items():
        if m := re.match(r"(.*)\.block_sparse_moe\.experts\.(\d+)\.(w\d)\.weight$", name):
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
        else:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = t
    for layer, w in experts.items():
        stack = {k: torch.stack([v[e] for e in sorted(v)]) for k, v in w.items()}
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.cat([stack["w1"], stack["w3"]], dim=1)
        out[f"{layer}.mlp.experts.down_proj"] = stack["w2"]
    return dict(sorted(out.items()))


def build_arch(arch: str, out: Path) -> None:
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file

    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**SIZES, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # the names and config transformers writes
        with safe_open(f"{tmp}/model.safetensors", "pt") as f:
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
        if arch.endswith("_fused"):  # the layout transformers 5 holds in memory
            shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()
                      if not (config.tie_word_embeddings and n == "lm_head.weight")}
        base = {n: base_value(arch, n, s) for n, s in sorted(shapes.items())}
        if arch.endswith("_buffers"):
            base |= neox_buffers(config)
        for stream in ("base", "ft_a", "ft_b"):
            folder = out / f"{arch}-{stream}"
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            tensors = base if stream == "base" else {
                n: t if t.dtype != torch.bfloat16 else fine_tune(arch, stream, n, t) for n, t in base.items()}
            if arch == "mixtral_mixed" and stream != "ft_a":
                tensors = fuse_experts(tensors)
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
            shutil.copy(f"{tmp}/config.json", folder / "config.json")
            if stream == "base":
                shutil.copy(f"{tmp}/generation_config.json", folder / "generation_config.json")
                mg.write_tokenizer(folder, 0)
    print(f"built {arch}: {len(base)} tensors", flush=True)


# --- orchestration (the system python3.11) ----------------------------------------------------


def run_recipe(root: Path, recipe: str, prefix: list, log_dir: Path) -> str:
    return mg.run_recipe(root, VERSION, recipe, log_dir, prefix, here=HERE, options=options(recipe), tag="arch")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv-root", type=Path, default=Path.home() / ".cache" / "remerge-parity")
    ap.add_argument("--python", default="python3.11")
    ap.add_argument("--only", action="append", default=[], help="recipe name (repeatable)")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--_build", dest="build", help=argparse.SUPPRESS)  # inside the venv
    args = ap.parse_args(argv)
    if args.build:
        for arch in args.build.split(","):
            build_arch(arch, HERE / "models")
        return 0

    root = args.venv_root.expanduser().resolve()
    py = mg.ensure_venv(root, VERSION, args.python)
    if not args.skip_models:
        subprocess.run([str(py), __file__, "--_build", ",".join(ARCHS)], check=True)
    (HERE / "recipes").mkdir(parents=True, exist_ok=True)
    texts = recipes()
    for name, text in texts.items():
        (HERE / "recipes" / f"{name}.yml").write_text(text)
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = mg.no_aslr_prefix()
    for name in args.only or texts:
        print(f"[{VERSION}] {name}: {run_recipe(root, name, prefix, log_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
