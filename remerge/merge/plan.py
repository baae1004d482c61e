"""The shard plan of a merge: every output tensor's inputs, dtype and shard (no torch here).

    plan_merge(recipe, folders) -> Plan        from the input headers alone

Made once per merge and shared by every grid point: it does not depend on per-model weights,
densities or any other parameter value, only on the models, the slices, the method's need of a
base, the dtypes and the release. Each shard job reads it; so does the job that writes the index.

The output tensors are those mergekit plans (`Recipe.output_slices`): the embeddings from the
first slice's sources, then every slice's layers (output layer o reads layer start + k of each
source, o counting up over all slices), then the tensors after the layers from the last slice's
sources (`Recipe.post_sources`). A `models:` recipe is one slice of all layers. They are saved,
and so cut into shards, in the order mergekit saves them (`remerge.merge.schedule`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from remerge.errors import ModelError, RecipeError
from remerge.io.files import write_bytes_atomic
from remerge.io.layout import INDEX_NAME, tensor_nbytes
from remerge.io.safetensors import DTYPE_NAMES, ST_NAMES, ModelFolder
from remerge.merge.architecture import Architecture, architecture_of, layer_index, layer_suffix
from remerge.merge.recipe import Recipe
from remerge.merge.releases import Release, get_release
from remerge.merge.schedule import Read, save_order

log = logging.getLogger(__name__)

PLAN_FORMAT = "remerge.plan/3"
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
    slice: int = 0  # the recipe slice whose parameters apply (`Recipe.output_slices`)
    # an embedding under a tokenizer setting: how each input's rows are re-rowed for the output
    # vocabulary before the method runs (`remerge.merge.tokenizer.vocab_layout`); None: as stored
    vocab: dict | None = None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    def input_name(self, ref: str) -> str:
        """The tensor mergekit asks model `ref` for (its per-model filters match this name):
        the layer it reads, else the output's own name (a tied lm_head is `lm_head.weight`)."""
        source = self.sources.get(ref)
        return source if source is not None and layer_index(self.name) is not None else self.name


@dataclass
class Plan:
    version: str  # the mergekit release whose semantics the merge follows
    method: str
    base_model: str | None
    models: dict[str, str]  # reference -> folder, in recipe input order
    dtype: str | None
    out_dtype: str | None
    shards: list[list[str]]  # tensor names per output shard, in save order
    tensors: dict[str, TensorPlan] = field(default_factory=dict)  # in save order
    slices: list[list[list]] | None = None  # `slices:` as [[model, start, end], ...] per slice
    # model -> its composed tensors (`ModelFolder.compose`: Mixtral's experts stored one by one)
    composed: dict[str, dict[str, dict]] = field(default_factory=dict)

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
        return {ref: ModelFolder(path, label=ref, composed=self.composed.get(ref))
                for ref, path in self.models.items()}

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
        mine = (self.version, self.method, self.base_model, list(self.models), self.dtype,
                self.out_dtype, self.slices)
        theirs = (recipe.release.version, recipe.method.name, recipe.base_model, list(recipe.inputs),
                  recipe.dtype, recipe.out_dtype, slice_layout(recipe))
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


def _config(ref: str, folder: ModelFolder) -> dict:
    """The model's config.json (it names the architecture)."""
    path = folder.path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ModelError(f"model {ref}: cannot read {path} ({err.strerror}); remerge needs it to "
                         "know the model's architecture") from None
    except ValueError as err:
        raise ModelError(f"model {ref}: {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ModelError(f"model {ref}: {path} is not a JSON object")
    return config


def model_architecture(models: Mapping[str, ModelFolder]) -> tuple[Architecture, dict[str, dict]]:
    """The architecture every input shares (from each config.json), and each input's config.
    Different architectures are refused, as mergekit does without `--allow-crimes`. A layer
    tensor a model stores in the checkpoint layout (`Architecture.checkpoint_tensors`) is added
    to its folder as a composed tensor, read as mergekit converts it while loading."""
    configs = {ref: _config(ref, folder) for ref, folder in models.items()}
    archs = {ref: architecture_of(ref, config) for ref, config in configs.items()}
    first = next(iter(archs))
    for ref, arch in archs.items():
        if arch.name != archs[first].name:
            raise RecipeError(f"model {ref} is a {arch.name} and model {first} a {archs[first].name}; "
                              "mergekit refuses to mix architectures (without --allow-crimes), and so "
                              "does remerge")
        shapes = {n: info.shape for n, info in models[ref].tensors.items()}
        for name, (shape, parts) in arch.checkpoint_tensors(ref, shapes).items():
            models[ref].compose(name, shape, parts)
    return archs[first], configs


def _num_layers(folder: ModelFolder, config: Mapping, arch: Architecture) -> int:
    """The architecture's layer count key of the model's config (`num_hidden_layers`), else
    the highest layer index + 1."""
    try:
        return int(config[arch.layers_key])
    except (KeyError, TypeError, ValueError):
        return 1 + max((i for n in folder.tensors if (i := layer_index(n)) is not None), default=0)


def slice_layout(recipe: Recipe) -> list[list[list]] | None:
    """The recipe's slices as plain lists ([[model, start, end], ...] per slice; None for
    `models:`), as the plan records them."""
    if recipe.slices is None:
        return None
    return [[[s.model, *s.layer_range] for s in sl.sources] for sl in recipe.slices]


@dataclass(frozen=True)
class _Planned:
    """One output tensor as mergekit plans it, before any header is read beyond names."""

    name: str
    reads: dict[str, str]  # model -> the tensor it is asked for, in the slice's source order
    slice: int  # the slice whose parameters apply
    t: float  # position for layer gradients, in [0, 1]


def slice_ranges(recipe: Recipe, layers: Mapping[str, int]) -> list[list[tuple[str, int, int]]]:
    """Every slice's sources as (model, start, end), checked against each model's layers
    (`layers`: model -> its number of layers); a `models:` source takes all of them."""
    out = []
    for i, sl in enumerate(recipe.output_slices):
        ranges = [(s.model, *(s.layer_range or (0, layers[s.model]))) for s in sl.sources]
        where = "`models`" if recipe.slices is None else f"slices[{i}]"
        if len({end - start for _, start, end in ranges}) > 1:
            counts = ", ".join(f"{m}: {end - start}" for m, start, end in ranges)
            raise RecipeError(f"{where}: the models have different numbers of layers ({counts}); "
                              "mergekit merges layer by layer and refuses this ('All inputs to a "
                              "slice must contain the same number of layers')")
        for j, (model, start, end) in enumerate(ranges):
            if end > layers[model]:
                raise RecipeError(
                    f"{where}.sources[{j}].layer_range [{start}, {end}]: model {model} has "
                    f"{layers[model]} layers (0 to {layers[model] - 1}); end may be at most "
                    f"{layers[model]} (mergekit fails while merging: 'Tensor model.layers."
                    f"{layers[model]}.input_layernorm.weight required but not present in model "
                    f"{model}')")
        out.append(ranges)
    return out


def gradient_t(offset: int, length: int) -> float:
    """Layer position for gradients: offset / (length - 1) within the slice, 1 for a slice of
    one layer (mergekit's `plan_slice`)."""
    return offset / (length - 1) if length > 1 else 1.0


def plan_layout(recipe: Recipe, models: Mapping[str, ModelFolder], layers: Mapping[str, int],
                arch: Architecture) -> list[_Planned]:
    """The output tensors in mergekit's plan order: the architecture's tensors before the
    layers (read from the first slice's sources, t = 0), each slice's layers in output order
    (each layer's tensors in the architecture's order), then its tensors after the layers
    (`Recipe.post_sources`, t as the release places them). Which are written: `_wanted`;
    tensors the architecture does not list are not (mergekit ignores them)."""
    slices = recipe.output_slices
    if recipe.slices is not None:
        _check_layered(recipe, models, arch)
    _warn_unlisted(models, arch)
    stored = {n for folder in models.values() for n in folder.tensors}
    suffixes = {layer_suffix(n) for n in stored if _in_layer(n, arch)}  # stored at some layer
    _warn_absent(arch, stored, suffixes)

    def outside(names: tuple[str, ...], readers: list[str], index: int, t: float) -> list[_Planned]:
        reads = [(n, {m: n for m in readers}) for n in names]
        return [_Planned(n, r, index, t) for n, r in reads
                if _wanted(r, n in stored, models, arch.is_optional(n))]

    planned = outside(arch.pre, [s.model for s in slices[0].sources], 0, 0.0)
    out = 0
    for i, (sl, ranges) in enumerate(zip(slices, slice_ranges(recipe, layers))):
        start = {model: first for model, first, _ in ranges}
        length = ranges[0][2] - ranges[0][1]
        for k in range(length):
            for suffix in arch.layer:
                reads = {m: arch.layer_name(start[m] + k, suffix) for m in sl.models}
                if _wanted(reads, suffix in suffixes, models, suffix in arch.optional):
                    planned.append(_Planned(arch.layer_name(out, suffix), reads, i, gradient_t(k, length)))
            out += 1
    post = [s.model for s in recipe.post_sources()]
    return planned + outside(arch.post, post, len(slices) - 1, recipe.release.gradient_t_after_layers)


def _wanted(reads: Mapping[str, str], stored_by_any: bool, models: Mapping[str, ModelFolder],
            optional: bool) -> bool:
    """Whether mergekit writes a tensor of the architecture: an optional one (a tied lm_head)
    when a model it is read from stores it; a required one when any input stores it (at some
    layer, for a layer's), and a model it is read from that lacks it is refused (`_sources`).
    mergekit also fails on a required tensor that no input stores; remerge leaves that out."""
    if optional:
        return any(models[m].has(n) for m, n in reads.items())
    return stored_by_any


def _warn_absent(arch: Architecture, stored: set[str], suffixes: set[str]) -> None:
    """Say which required tensors no input stores: mergekit fails on them, remerge leaves them out."""
    absent = [n for n in arch.pre + arch.post if n not in stored and not arch.is_optional(n)]
    absent += [arch.layer_name("N", s) for s in arch.layer if s not in suffixes and s not in arch.optional]
    if absent:
        log.warning("no input stores %s, which mergekit's %s definition requires: mergekit fails "
                    "('Tensor ... required but not present'); remerge leaves them out",
                    ", ".join(absent), arch.name)


def _in_layer(name: str, arch: Architecture) -> bool:
    """A decoder layer's tensor, named as the architecture names them (`model.layers.N.`)."""
    return name.startswith(arch.layer_prefix) and layer_index(name) is not None


def _warn_unlisted(models: Mapping[str, ModelFolder], arch: Architecture) -> None:
    """Say which stored tensors are not merged: those the architecture does not list (and no
    composed tensor reads)."""
    listed = set(arch.pre) | set(arch.post)
    for ref, folder in models.items():
        parts = {p for entry in folder.composed.values() for p in entry["parts"]}
        extra = [n for n in folder.tensors if n not in listed and n not in parts
                 and not (_in_layer(n, arch) and layer_suffix(n) in arch.layer)]
        if extra:
            log.warning("model %s: %d tensor(s) that mergekit's %s definition does not list are not "
                        "merged (mergekit ignores them): %s", ref, len(extra), arch.name,
                        ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else ""))


def _check_layered(recipe: Recipe, models: Mapping[str, ModelFolder], arch: Architecture) -> None:
    """Layer ranges need tensors named by layer (`model.layers.N.`)."""
    for sl in recipe.slices or ():
        for ref in sl.models:
            if not any(_in_layer(n, arch) for n in models[ref].tensors):
                raise RecipeError(
                    f"model {ref} ({arch.name}): none of its tensors is named like a decoder layer "
                    f"(`{arch.layer_prefix}N.`), so remerge cannot take layer ranges of it (whole "
                    "models under `models:` still merge)")


def _sources(planned: _Planned, models: Mapping[str, ModelFolder], recipe: Recipe,
             arch: Architecture) -> dict[str, str | None]:
    """Which tensor each model contributes to one output tensor (None: this model has none).

    Tied embeddings (`Architecture.tied`: Llama's `lm_head.weight`, optional): the release
    either reads a model's `model.embed_tokens.weight` in its place, or leaves such a model
    (not the base) out of that tensor. Any other tensor must exist in every model that the
    tensor reads.
    """
    fallback = recipe.release.lm_head_fallback
    sources: dict[str, str | None] = {}
    for ref, name in planned.reads.items():
        folder = models[ref]
        if folder.has(name):
            sources[ref] = name
        elif fallback == "embedding" and folder.has(tied := arch.tied.get(name, "")):
            sources[ref] = tied
        elif fallback == "skip" and arch.is_optional(name) and ref != recipe.base_model:
            sources[ref] = None
        else:
            holders = [r if n == name else f"{r} (as {n})" for r, n in planned.reads.items()
                       if models[r].has(n)]
            present = f"but present in {holders[0]}" if holders else "and the merge needs it"
            raise ModelError(f"tensor {name} is missing from model {ref} ({_where(folder)}) "
                             f"{present}; the models must share one architecture")
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
                  anchor: str, release: Release, rows: int | None = None) -> tuple[int, ...]:
    """The tensor's shape, which every input must share with the anchor (the base); for an
    embedding re-rowed to `rows` tokens, all but the first dimension, which becomes `rows`."""
    info = lambda ref: models[ref].info(sources[ref])  # noqa: E731
    ref0 = anchor if sources.get(anchor) else next(r for r, s in sources.items() if s)
    first = info(ref0)
    skip = 1 if rows is not None else 0
    for ref, src in sources.items():
        if src and info(ref).shape[skip:] != first.shape[skip:]:
            what = ("refuses it" if release.shape_mismatch == "error" else
                    "left such a model out of the tensor; remerge refuses rather than change the "
                    "result quietly")
            raise ModelError(
                f"tensor {name}: shape {list(info(ref).shape)} in model {ref} ({info(ref).file}) "
                f"differs from {list(first.shape)} in model {ref0} ({first.file}); merging needs "
                f"identical shapes (mergekit {release.version} {what}; different vocabularies "
                "need `tokenizer_source`)"
            )
    return first.shape if rows is None else (rows, *first.shape[1:])


def plan_tensor_layout(planned: _Planned, recipe: Recipe, models: Mapping[str, ModelFolder],
                       arch: Architecture, vocab: dict | None = None) -> TensorPlan:
    """One output tensor's sources, shape and dtypes (no parameter values); `vocab`: the
    tokenizer's layout, which an embedding takes."""
    sources = _sources(planned, models, recipe, arch)
    anchor = recipe.base_model if recipe.base_model in sources else next(iter(sources))
    vocab = vocab if arch.is_embedding(planned.name) else None
    shape = _check_shapes(planned.name, models, sources, anchor, recipe.release,
                          vocab["size"] if vocab else None)
    stored = {ref: models[ref].info(src).dtype for ref, src in sources.items() if src}
    base_dtype = stored.get(recipe.base_model) if recipe.base_model else None
    compute = _compute_dtype(recipe, list(stored.values()), base_dtype)
    out = recipe.out_dtype or recipe.method.result_dtype(compute)
    return TensorPlan(planned.name, shape, compute, ST_NAMES[out], planned.t, sources, stored,
                      planned.slice, vocab)


def plan_merge(recipe: Recipe, folders: Mapping[str, str | Path],
               out_shard_size: int = DEFAULT_SHARD_SIZE) -> Plan:
    """Decide every output tensor's inputs, dtype and shard from the input headers alone."""
    from remerge.merge.model_files import check_config

    check_config(recipe, folders)  # a config.json mergekit fails to write: refused before merging
    models = open_models(recipe, folders)
    arch, configs = model_architecture(models)
    layers = {ref: _num_layers(folder, configs[ref], arch) for ref, folder in models.items()}
    planned = plan_layout(recipe, models, layers, arch)
    vocab = None
    if recipe.tokenizer is not None:  # transformers, only for a tokenizer setting
        from remerge.merge.tokenizer import vocab_layout

        vocab = vocab_layout(recipe, folders)
    tensors = {p.name: plan_tensor_layout(p, recipe, models, arch, vocab) for p in planned}
    for folder in models.values():
        folder.close()
    # a composed input is no stored name: mergekit's scheduler labels its load "" (`schedule`)
    stored = lambda ref, src: None if src in models[ref].composed else src  # noqa: E731
    order = save_order(recipe.release, [
        (p.name, [Read(ref, asked, stored(ref, tensors[p.name].sources[ref]))
                  for ref, asked in p.reads.items()])
        for p in planned])
    tensors = {name: tensors[name] for name in order}
    return Plan(
        version=recipe.release.version, method=recipe.method.name, base_model=recipe.base_model,
        models={ref: str(folders[ref]) for ref in recipe.inputs}, dtype=recipe.dtype,
        out_dtype=recipe.out_dtype, shards=cut_shards(tensors.values(), out_shard_size),
        tensors=tensors, slices=slice_layout(recipe),
        composed={ref: f.composed for ref, f in models.items() if f.composed},
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
