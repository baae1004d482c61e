"""Tensor names the engine must know about: Llama-family names (mergekit's default layout).

mergekit 0.1.5 defines each architecture in its own file (which tensors exist, which are
optional or tied, per-layer templates); remerge knows the Llama layout only, for now, and the
order in which mergekit plans a layer's tensors for a few architectures (it decides which of
two tensors that read the same name mergekit saves first, `remerge.merge.schedule`).
"""

from __future__ import annotations

import re

LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"  # what a model with tied embeddings reads for lm_head
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")

# A decoder layer's tensors in the order of mergekit's templates (`_data/architectures/*.json`,
# the same in 0.0.5.1 and 0.1.5), which is the order it plans them in; by `model_type`.
_LLAMA_LAYER = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                "post_attention_layernorm.weight", "mlp.up_proj.weight", "mlp.gate_proj.weight",
                "mlp.down_proj.weight")
LAYER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LAYER,
    "mistral": _LLAMA_LAYER,
    "qwen2": ("input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
              "mlp.up_proj.weight", "post_attention_layernorm.weight", "self_attn.k_proj.bias",
              "self_attn.k_proj.weight", "self_attn.o_proj.weight", "self_attn.q_proj.bias",
              "self_attn.q_proj.weight", "self_attn.v_proj.bias", "self_attn.v_proj.weight"),
    "qwen3": ("input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
              "mlp.up_proj.weight", "post_attention_layernorm.weight", "self_attn.k_norm.weight",
              "self_attn.k_proj.weight", "self_attn.q_norm.weight", "self_attn.q_proj.weight",
              "self_attn.v_proj.weight", "self_attn.o_proj.weight"),
}
POST_TEMPLATE = ("model.norm.weight", LM_HEAD)  # the tensors after the layers, in plan order


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (`model.layers.3.mlp...` -> 3), else None."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def with_layer_index(name: str, index: int) -> str:
    """The same tensor of another layer: (`model.layers.3.mlp.up_proj.weight`, 7) ->
    `model.layers.7.mlp.up_proj.weight`."""
    match = _LAYER_RE.search(name)
    return f"{name[:match.start(1)]}{index}{name[match.end(1):]}"


def layer_suffix(name: str) -> str:
    """What a layer's tensor is, without the layer: `model.layers.3.mlp.up_proj.weight` ->
    `mlp.up_proj.weight`."""
    return name[_LAYER_RE.search(name).end():]


def is_embedding(name: str) -> bool:
    """Embedding tensors (before the layers: gradients take their first value)."""
    return "embed" in name


def plan_rank(names: list[str], template: tuple[str, ...]) -> list[str]:
    """`names` in the order of `template` (a layer's suffixes or the post tensors), names the
    template lacks after it, sorted."""
    def rank(name: str) -> tuple[int, str]:
        key = layer_suffix(name) if layer_index(name) is not None else name
        return (template.index(key), "") if key in template else (len(template), name)

    return sorted(names, key=rank)


def layer_template(model_type: str | None) -> tuple[str, ...]:
    """The order mergekit plans a layer's tensors in (Llama's for architectures not listed)."""
    return LAYER_TEMPLATES.get(model_type or "", _LLAMA_LAYER)
