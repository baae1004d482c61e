"""File names of a merged model folder, as mergekit names them (no torch here)."""

from __future__ import annotations

from remerge.merge.methods import LEGACY

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# bytes per element of each safetensors dtype
ELEMENT_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4,
                 "I64": 8, "BOOL": 1}


def shard_names(count: int, version: str) -> list[str]:
    """`model-0000i-of-0000K.safetensors`; mergekit 0.1.5 names a lone shard `model.safetensors`."""
    if count == 1 and version != LEGACY:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
