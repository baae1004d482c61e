"""Tiny Llama-shaped safetensors folders for tests (no transformers needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER, VOCAB, LAYERS = 16, 32, 24, 3


def llama_shapes(layers: int = LAYERS, tied: bool = False) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (HIDDEN // 2, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        }
    return shapes


def random_tensors(seed: int, dtype=torch.bfloat16, tied: bool = False, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in llama_shapes(layers, tied).items()}


def finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in base.items()}


def write_model(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1, layers: int = LAYERS,
                tied: bool = False) -> Path:
    """Save tensors as `shards` safetensors files (+ index when > 1) and a config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, folder / fname, metadata={"format": "pt"})
            weight_map |= {n: fname for n in part}
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "vocab_size": VOCAB,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": HIDDEN // 4,
              "torch_dtype": dtype, "tie_word_embeddings": tied}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# A TIES recipe over a base and two fine-tunes (format with a=, b=, base= folders): densities
# below 1, one of them a gradient, weights that bf16 rounds.
TIES_RECIPE = """\
models:
  - model: {a}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.3, density: [0.2, 0.9]}}
merge_method: ties
base_model: {base}
parameters: {{normalize: true, int8_mask: true}}
dtype: bfloat16
"""
