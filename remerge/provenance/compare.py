"""Comparing what a recipe makes with what was published: tensors byte for byte (with the
size of any difference), json files key by key."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from remerge.io.layout import INDEX_NAME
from remerge.io.safetensors import ModelFolder, torch_dtype

if TYPE_CHECKING:
    import numpy
    import torch

    from remerge.merge.tensor import TensorTask

log = logging.getLogger(__name__)


# --- tensors -------------------------------------------------------------------------------


def ordered_bits(t: "torch.Tensor") -> "torch.Tensor":
    """Integers whose order and differences follow the floats' (for ulp distances):
    sign-magnitude bit patterns mapped to two's complement (+0 and -0 both 0)."""
    import torch

    width = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}[t.dtype]
    bits = t.contiguous().view(width).to(torch.int64)
    sign_bit = 1 << (8 * t.element_size() - 1)
    magnitude = bits & (sign_bit - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def _as_tensor(raw: "numpy.ndarray", dtype: str) -> "torch.Tensor":
    """A flat tensor of safetensors dtype `dtype` over the bytes of `raw` (copied)."""
    import numpy as np
    import torch

    signed = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[raw.itemsize]
    return torch.from_numpy(raw.view(signed).copy()).view(torch_dtype(dtype))


def bytes_difference(ours: "numpy.ndarray", theirs: "numpy.ndarray", dtype: str) -> dict[str, Any] | None:
    """None when two tensors of the same dtype and size have the same bytes; else how many
    elements differ, the largest |difference| and the largest distance in ulps."""
    import numpy as np

    if np.array_equal(ours, theirs):
        return None
    differ = ours != theirs
    out: dict[str, Any] = {"elements": int(ours.size), "differing_elements": int(differ.sum())}
    a, b = _as_tensor(ours, dtype), _as_tensor(theirs, dtype)
    if a.is_floating_point():
        import torch

        mask = torch.from_numpy(differ)
        out["max_abs_diff"] = float((a.double() - b.double()).abs()[mask].max())
        out["max_ulp"] = int((ordered_bits(a) - ordered_bits(b)).abs()[mask].max())
    return out


def compare_tensors(expected: Iterable[tuple["TensorTask", "numpy.ndarray"]],
                    published: ModelFolder, checked_apart: Iterable[str] = ()) -> dict[str, Any]:
    """Compare each (task, the bytes the recipe makes) with the published tensor; tensors
    `checked_apart` (random draws, checked element by element) are not "extra"."""
    differing, identical, missing = [], 0, []
    seen = set()
    for task, ours in expected:
        seen.add(task.name)
        if not published.has(task.name):
            missing.append(task.name)
            continue
        info = published.info(task.name)
        if (info.dtype, tuple(info.shape)) != (task.dtype, task.shape):
            diff = {"dtype": [task.dtype, info.dtype], "shape": [list(task.shape), list(info.shape)]}
        else:
            diff = bytes_difference(ours, published.raw(task.name), task.dtype)
        if diff is None:
            identical += 1
        else:
            differing.append({"name": task.name, **diff})
            log.info("tensor %s differs: %s", task.name, diff)
    extra = sorted(set(published.tensors) - seen - set(checked_apart))
    return {"compared": len(seen), "identical": identical, "differing": differing,
            "missing": missing, "extra": extra}


# --- json files ----------------------------------------------------------------------------


# Keys that record the author's installation, not the model: reported, never a difference.
INSTALLATION_KEYS = ("_name_or_path", "transformers_version")


def json_diff(ours: Any, theirs: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Dotted keys whose values differ, with both values (absent -> null, marked).
    Top-level `INSTALLATION_KEYS` are left out."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(ours) | set(theirs), key=str):
            if not prefix and key in INSTALLATION_KEYS:
                continue
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in ours:
                out.append({"key": path, "expected": None, "published": theirs[key], "only_in": "published"})
            elif key not in theirs:
                out.append({"key": path, "expected": ours[key], "published": None, "only_in": "expected"})
            else:
                out += json_diff(ours[key], theirs[key], path)
        return out
    return [] if ours == theirs else [{"key": prefix or "(whole file)", "expected": ours, "published": theirs}]


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return {"__unreadable__": str(err)}


def compare_json_files(expected: Mapping[str, Any], published: Path,
                       inputs: Mapping[str, Path]) -> dict[str, Any]:
    """Compare expected json contents with the published .json files (index excluded).

    A differing file that equals an input model's file of the same name is explained as
    coming from that model (a config transplant)."""
    theirs = {p.name: p for p in published.glob("*.json") if p.name != INDEX_NAME}
    identical, differing = [], []
    for name in sorted(set(expected) & set(theirs)):
        keys = json_diff(expected[name], load_json(theirs[name]))
        if not keys:
            identical.append(name)
            continue
        entry: dict[str, Any] = {"file": name, "keys": keys}
        for model, folder in inputs.items():
            if (folder / name).is_file() and load_json(folder / name) == load_json(theirs[name]):
                entry["matches"] = model
                break
        differing.append(entry)
    return {"identical": identical, "differing": differing,
            "missing": sorted(set(expected) - set(theirs)), "extra": sorted(set(theirs) - set(expected))}
