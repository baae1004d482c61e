"""File names of a merged model folder, as mergekit names them, and element sizes (no torch).

Shard names depend on the mergekit release (`remerge.merge.releases.Release.shard_names`)."""

from __future__ import annotations

import math
from typing import Sequence

INDEX_NAME = "model.safetensors.index.json"
# bytes per element of each safetensors dtype
ELEMENT_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4,
                 "I64": 8, "BOOL": 1}


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of safetensors dtype `dtype` and shape `shape`."""
    return ELEMENT_SIZES[dtype] * math.prod(shape)
