"""Tensor names the engine must know about: Llama-family names (mergekit's default layout).

mergekit 0.1.5 defines each architecture in its own file (which tensors exist, which are
optional or tied, per-layer templates); remerge knows the Llama layout only, for now.
"""

from __future__ import annotations

import re

LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"  # what a model with tied embeddings reads for lm_head
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (`model.layers.3.mlp...` -> 3), else None."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def is_embedding(name: str) -> bool:
    """Embedding tensors (before the layers: gradients take their first value)."""
    return "embed" in name
