"""The shard plan of a merge: every output tensor's inputs, dtype and shard (no torch here).

    plan_merge(recipe, folders) -> Plan        from the input headers alone

Made once per merge and shared by every grid point: it does not depend on per-model weights,
densities or any other parameter value, only on the models, the method's need of a base, the
dtypes and the release. Each shard job reads it; so does the job that writes the index.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from remerge.errors import ModelError, RecipeError
from remerge.io.files import write_bytes_atomic
from remerge.io.layout import INDEX_NAME, tensor_nbytes
from remerge.io.safetensors import DTYPE_NAMES, ST_NAMES, ModelFolder
from remerge.merge.architecture import EMBED, LM_HEAD, is_embedding, layer_index
from remerge.merge.recipe import Recipe
from remerge.merge.releases import Release, get_release

PLAN_FORMAT = "remerge.plan/2"
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
    stored: dict[str, str]  # model reference -> safetensors dtype of that tensor (present ones)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass
class Plan:
    version: str  # the mergekit release whose semantics the merge follows
    method: str
    base_model: str | None
    models: dict[str, str]  # reference -> folder, in recipe input order
    dtype: str | None
    out_dtype: str | None
    shards: list[list[str]]  # tensor names per output shard, in save order
    tensors: dict[str, TensorPlan] = field(default_factory=dict)

    @property
    def release(self) -> Release:
        return get_release(self.version)

    @property
    def shard_names(self) -> list[str]:
        return self.release.shard_names(len(self.shards))

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def shard_bytes(self, index: int) -> int:
        return sum(self.tensors[n].nbytes for n in self.shards[index])

    def open_models(self) -> dict[str, ModelFolder]:
        return {ref: ModelFolder(path, label=ref) for ref, path in self.models.items()}

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

    @classmethod
    def read(cls, path: str | Path) -> "Plan":
        try:
            return cls.from_json(Path(path).read_text(), where=str(path))
        except OSError as err:
            raise ModelError(f"cannot read the shard plan {path}: {err.strerror}; re-run the plan step") from None

    def check_recipe(self, recipe: Recipe) -> None:
        """Refuse a recipe that does not match the layout this plan was made for."""
        mine = (self.version, self.method, self.base_model, list(self.models), self.dtype, self.out_dtype)
        theirs = (recipe.release.version, recipe.method.name, recipe.base_model, list(recipe.inputs),
                  recipe.dtype, recipe.out_dtype)
        if mine != theirs:
            raise RecipeError(
                f"the shard plan was made for another recipe ({mine} vs {theirs}); plan again"
            )


# --- planning ------------------------------------------------------------------------------


def open_models(recipe: Recipe, folders: Mapping[str, str | Path]) -> dict[str, ModelFolder]:
    """Every input of the recipe, opened lazily (headers checked), in recipe order."""
    missing = [ref for ref in recipe.inputs if ref not in folders]
    if missing:
        raise RecipeError(f"no folder given for model(s) {missing}")
    return {ref: ModelFolder(folders[ref], label=ref) for ref in recipe.inputs}


def _num_layers(folder: ModelFolder) -> int:
    """`num_hidden_layers` of the model's config, else the highest layer index + 1."""
    try:
        config = json.loads((folder.path / "config.json").read_text())
        return int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1 + max((i for n in folder.tensors if (i := layer_index(n)) is not None), default=0)


def gradient_t(name: str, num_layers: int, release: Release) -> float:
    """Layer position of a tensor for gradients: i / (L - 1) inside the layers; embeddings 0;
    tensors after the layers as the release places them."""
    index = layer_index(name)
    if index is not None:
        return index / (num_layers - 1) if num_layers > 1 else 1.0
    if is_embedding(name):
        return 0.0
    return release.gradient_t_after_layers


def _sources(name: str, models: Mapping[str, ModelFolder], recipe: Recipe) -> dict[str, str | None]:
    """Which tensor each model contributes to output `name` (None: this model has none).

    Tied embeddings: `lm_head.weight` is optional. The release either reads a model's
    `model.embed_tokens.weight` in its place, or leaves such a model (not the base) out of
    that tensor. Any other tensor must exist in every model.
    """
    fallback = recipe.release.lm_head_fallback
    sources: dict[str, str | None] = {}
    for ref, folder in models.items():
        if folder.has(name):
            sources[ref] = name
        elif name == LM_HEAD and fallback == "embedding" and folder.has(EMBED):
            sources[ref] = EMBED
        elif name == LM_HEAD and fallback == "skip" and ref != recipe.base_model:
            sources[ref] = None
        else:
            raise ModelError(
                f"tensor {name} is missing from model {ref} ({_where(folder)}) but present "
                f"in {next(r for r, f in models.items() if f.has(name))}; the models must "
                "share one architecture"
            )
    return sources


def _where(folder: ModelFolder) -> str:
    index = folder.path / INDEX_NAME
    return str(index if index.is_file() else folder.path)


# float promotion as torch.promote_types does it for the dtypes models are stored in
_RANK = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}


def _promote(a: str, b: str) -> str:
    if a == b:
        return a
    if {a, b} == {"float16", "bfloat16"}:
        return "float32"
    return max(a, b, key=lambda d: _RANK.get(d, 0))


def _compute_dtype(recipe: Recipe, stored: Sequence[str], base_dtype: str | None) -> str:
    """Recipe dtype, else the base's (releases that cast inputs to it), else the promoted type."""
    if recipe.dtype:
        return recipe.dtype
    if recipe.release.missing_dtype == "base" and base_dtype is not None:
        return DTYPE_NAMES[base_dtype]
    dtype = DTYPE_NAMES[stored[0]]
    for st in stored[1:]:
        dtype = _promote(dtype, DTYPE_NAMES[st])
    return dtype


def _check_shapes(name: str, models: Mapping[str, ModelFolder], sources: Mapping[str, str | None],
                  anchor: str, release: Release) -> tuple[int, ...]:
    """The tensor's shape, which every input must share with the anchor (the base)."""
    info = lambda ref: models[ref].info(sources[ref])  # noqa: E731
    ref0 = anchor if sources.get(anchor) else next(r for r, s in sources.items() if s)
    first = info(ref0)
    for ref, src in sources.items():
        if src and info(ref).shape != first.shape:
            what = ("refuses it" if release.shape_mismatch == "error" else
                    "left such a model out of the tensor; remerge refuses rather than change the "
                    "result quietly")
            raise ModelError(
                f"tensor {name}: shape {list(info(ref).shape)} in model {ref} ({info(ref).file}) "
                f"differs from {list(first.shape)} in model {ref0} ({first.file}); merging needs "
                f"identical shapes (mergekit {release.version} {what}; different vocabularies "
                "need tokenizer merging, which remerge does not support)"
            )
    return first.shape


def output_names(recipe: Recipe, models: Mapping[str, ModelFolder]) -> list[str]:
    """The output tensors: the base's (first input's without a base), plus `lm_head.weight`
    when any input has it; in mergekit's save order (sorted by name)."""
    anchor = models[recipe.base_model or recipe.inputs[0]]
    names = set(anchor.tensors)
    if any(f.has(LM_HEAD) for f in models.values()):
        names.add(LM_HEAD)
    return sorted(names)


def plan_tensor_layout(name: str, recipe: Recipe, models: Mapping[str, ModelFolder],
                       num_layers: int) -> TensorPlan:
    """One output tensor's sources, shape and dtypes (no parameter values)."""
    anchor = recipe.base_model or recipe.inputs[0]
    sources = _sources(name, models, recipe)
    shape = _check_shapes(name, models, sources, anchor, recipe.release)
    stored = {ref: models[ref].info(src).dtype for ref, src in sources.items() if src}
    base_dtype = stored.get(recipe.base_model) if recipe.base_model else None
    compute = _compute_dtype(recipe, list(stored.values()), base_dtype)
    out = recipe.out_dtype or recipe.method.result_dtype(compute)
    return TensorPlan(name, shape, compute, ST_NAMES[out],
                      gradient_t(name, num_layers, recipe.release), sources, stored)


def plan_merge(recipe: Recipe, folders: Mapping[str, str | Path],
               out_shard_size: int = DEFAULT_SHARD_SIZE) -> Plan:
    """Decide every output tensor's inputs, dtype and shard from the input headers alone."""
    models = open_models(recipe, folders)
    num_layers = _num_layers(models[recipe.base_model or recipe.inputs[0]])
    tensors = {name: plan_tensor_layout(name, recipe, models, num_layers)
               for name in output_names(recipe, models)}
    for folder in models.values():
        folder.close()
    return Plan(
        version=recipe.release.version, method=recipe.method.name, base_model=recipe.base_model,
        models={ref: str(folders[ref]) for ref in recipe.inputs}, dtype=recipe.dtype,
        out_dtype=recipe.out_dtype, shards=cut_shards(tensors.values(), out_shard_size),
        tensors=tensors,
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


# --- the index -------------------------------------------------------------------------------


def index_json(plan: Plan) -> str:
    """model.safetensors.index.json exactly as the followed release writes it."""
    names = plan.shard_names
    weight_map = {t: names[i] for i, shard in enumerate(plan.shards) for t in shard}
    values = {"mergekit_version": plan.version, "total_size": plan.total_size}
    fmt = plan.release.index
    meta = {key: values[key] for key in fmt.metadata_keys}
    return json.dumps({"metadata": meta, "weight_map": weight_map}, indent=fmt.indent)


def write_index(plan: Plan, out_dir: str | Path, always: bool = False) -> Path | None:
    """Write the index (some releases write none for a single shard, unless `always`)."""
    if len(plan.shards) == 1 and not plan.release.index.lone_shard and not always:
        return None
    path = Path(out_dir) / INDEX_NAME
    write_bytes_atomic(path, index_json(plan).encode())
    return path
