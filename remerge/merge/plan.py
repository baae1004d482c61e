"""The shard plan of a merge: every output tensor's inputs, dtype and shard (no torch here).

Made once per merge from the input headers (`remerge.merge.engine.plan_merge`), shared by every
grid point (it does not depend on weights or densities), read by each shard job and by the
job that writes the index.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from remerge.errors import ModelError, RecipeError
from remerge.io.files import write_bytes_atomic
from remerge.io.layout import ELEMENT_SIZES, INDEX_NAME, SINGLE_NAME, shard_names
from remerge.merge.methods import LEGACY
from remerge.merge.recipe import Recipe

PLAN_FORMAT = "remerge.plan/1"
DEFAULT_SHARD_SIZE = 5 * 1000**3  # mergekit's default `--out-shard-size 5B`


def parse_size(value: str | int) -> int:
    """mergekit's size syntax: an int, or a number with K / M / B (powers of 1000)."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    scale = {"k": 1000, "m": 1000**2, "b": 1000**3}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale != 1 else text
    if not digits.isdigit() or int(digits) <= 0:
        raise RecipeError(f"shard size `{value}` is not a size such as 5B, 500M or 20K")
    return int(digits) * scale


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where its inputs are and what comes out."""

    name: str
    shape: tuple[int, ...]
    compute_dtype: str  # torch name, e.g. "bfloat16"
    dtype: str  # safetensors name of the output, e.g. "BF16"
    t: float  # position for layer gradients, in [0, 1]
    sources: dict[str, str | None]  # model reference -> tensor name to read (None: absent)

    @property
    def nbytes(self) -> int:
        n = ELEMENT_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class Plan:
    version: str  # mergekit semantics
    method: str
    base_model: str | None
    models: dict[str, str]  # reference -> folder, in recipe input order
    dtype: str | None
    out_dtype: str | None
    shards: list[list[str]]  # tensor names per output shard, in save order
    tensors: dict[str, TensorPlan] = field(default_factory=dict)

    @property
    def shard_names(self) -> list[str]:
        return shard_names(len(self.shards), self.version)

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def shard_bytes(self, index: int) -> int:
        return sum(self.tensors[n].nbytes for n in self.shards[index])

    def to_json(self) -> str:
        data = asdict(self)
        data["tensors"] = [asdict(t) for t in self.tensors.values()]
        return json.dumps({"format": PLAN_FORMAT, **data}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> "Plan":
        try:
            data = json.loads(text)
            if data.pop("format") != PLAN_FORMAT:
                raise ValueError("unknown format")
            tensors = [TensorPlan(**{**t, "shape": tuple(t["shape"])}) for t in data.pop("tensors")]
            return cls(**data, tensors={t.name: t for t in tensors})
        except (ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{where}: not a remerge shard plan ({err}); re-run the plan step") from None

    def check_recipe(self, recipe: Recipe) -> None:
        """Refuse a recipe that does not match the layout this plan was made for."""
        mine = (self.version, self.method, self.base_model, list(self.models), self.dtype, self.out_dtype)
        theirs = (recipe.version, recipe.method.name, recipe.base_model, list(recipe.inputs),
                  recipe.dtype, recipe.out_dtype)
        if mine != theirs:
            raise RecipeError(
                f"the shard plan was made for another recipe ({mine} vs {theirs}); plan again"
            )


def cut_shards(tensors: Iterable[TensorPlan], max_bytes: int) -> list[list[str]]:
    """mergekit's cut: start a new shard when the next tensor would overflow a non-empty one."""
    shards: list[list[str]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t.name)
        size += t.nbytes
    return shards


def index_json(plan: Plan) -> str:
    """model.safetensors.index.json exactly as the followed mergekit version writes it."""
    names = plan.shard_names
    weight_map = {t: names[i] for i, shard in enumerate(plan.shards) for t in shard}
    if plan.version == LEGACY:
        meta = {"mergekit_version": LEGACY, "total_size": plan.total_size}
        return json.dumps({"metadata": meta, "weight_map": weight_map})
    meta = {"total_size": plan.total_size, "mergekit_version": plan.version}
    return json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2)


def write_index(plan: Plan, out_dir: str | Path, always: bool = False) -> Path | None:
    """Write the index (mergekit 0.1.5 writes none for a single shard unless `always`)."""
    if plan.shard_names == [SINGLE_NAME] and not always:
        return None
    path = Path(out_dir) / INDEX_NAME
    write_bytes_atomic(path, index_json(plan).encode())
    return path
