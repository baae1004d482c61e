"""The streaming merge: plan the output shards, merge one shard at a time, write the index.

    plan_merge(recipe, folders)            -> Plan   (headers only: names, shapes, shard cut)
    merge_shard(plan, recipe, i, path)     one output shard, one tensor at a time
    write_index(plan, out_dir)             model.safetensors.index.json, as mergekit writes it

A shard job keeps the working set of one tensor (one tensor per input, the stacked task
vectors and the result) and writes each result straight to its offset in the output file,
so its memory does not grow with the shard. The plan does not depend on per-model weights
or densities, so all points of a grid share one plan.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from remerge.merge.kernels import native
from remerge.errors import ModelError, RecipeError
from remerge.io.files import write_bytes_atomic
from remerge.io.layout import INDEX_NAME
from remerge.merge.methods import LEGACY
from remerge.merge.plan import DEFAULT_SHARD_SIZE, Plan, TensorPlan, cut_shards, write_index
from remerge.merge.recipe import Recipe, tensor_parameters
from remerge.io.safetensors import DTYPE_NAMES, ST_NAMES, ModelFolder, ShardWriter, torch_dtype

if TYPE_CHECKING:  # torch is imported where tensors are computed: the plain path needs none
    import numpy
    import torch

log = logging.getLogger(__name__)

LM_HEAD = "lm_head.weight"
LARGE_TENSOR_BYTES = 32 * 1024**2
EMBED = "model.embed_tokens.weight"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# --- planning ------------------------------------------------------------------------------


def open_models(recipe: Recipe, folders: Mapping[str, str | Path]) -> dict[str, ModelFolder]:
    """Every input of the recipe, opened lazily (headers checked), in recipe order."""
    missing = [ref for ref in recipe.inputs if ref not in folders]
    if missing:
        raise RecipeError(f"no folder given for model(s) {missing}")
    return {ref: ModelFolder(folders[ref], label=ref) for ref in recipe.inputs}


def _num_layers(folder: ModelFolder) -> int | None:
    try:
        config = json.loads((folder.path / "config.json").read_text())
        return int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def gradient_t(name: str, num_layers: int, version: str) -> float:
    """Layer position of a tensor for gradients: i / (L - 1) inside the layers; embeddings 0;
    tensors after the layers 1 in mergekit 0.0.5.1 and 0 in 0.1.5."""
    match = _LAYER_RE.search(name)
    if match:
        return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0
    if "embed" in name:
        return 0.0
    return 1.0 if version == LEGACY else 0.0


def _sources(name: str, models: Mapping[str, ModelFolder], recipe: Recipe) -> dict[str, str | None]:
    """Which tensor each model contributes to output `name` (None: this model has none).

    Tied embeddings: `lm_head.weight` is optional. mergekit 0.1.5 reads a model's
    `model.embed_tokens.weight` in its place; 0.0.5.1 leaves such a model out of that tensor.
    Any other tensor must exist in every model.
    """
    sources: dict[str, str | None] = {}
    for ref, folder in models.items():
        if folder.has(name):
            sources[ref] = name
        elif name == LM_HEAD and recipe.version != LEGACY and folder.has(EMBED):
            sources[ref] = EMBED
        elif name == LM_HEAD and recipe.version == LEGACY and ref != recipe.base_model:
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


def _compute_dtype(recipe: Recipe, infos: Sequence[tuple[str, str]], base_dtype: str | None) -> str:
    """Recipe dtype, else the base's (0.0.5.1 casts inputs to it), else the promoted type."""
    if recipe.dtype:
        return recipe.dtype
    if recipe.version == LEGACY and base_dtype is not None:
        return DTYPE_NAMES[base_dtype]
    dtype = DTYPE_NAMES[infos[0][1]]
    for _, st in infos[1:]:
        dtype = _promote(dtype, DTYPE_NAMES[st])
    return dtype


def _check_shapes(
    name: str, models: Mapping[str, ModelFolder], sources: Mapping[str, str | None], anchor: str
) -> tuple[int, ...]:
    """The tensor's shape, which every input must share with the anchor (the base)."""
    info = lambda ref: models[ref].info(sources[ref])  # noqa: E731
    ref0 = anchor if sources.get(anchor) else next(r for r, s in sources.items() if s)
    first = info(ref0)
    for ref, src in sources.items():
        if src and info(ref).shape != first.shape:
            raise ModelError(
                f"tensor {name}: shape {list(info(ref).shape)} in model {ref} ({info(ref).file}) "
                f"differs from {list(first.shape)} in model {ref0} ({first.file}); merging needs "
                "identical shapes (different vocabularies need tokenizer merging, which remerge "
                "does not support)"
            )
    return first.shape


def output_names(recipe: Recipe, models: Mapping[str, ModelFolder]) -> list[str]:
    """The output tensors: the base's (first input's for linear), plus `lm_head.weight` when
    any input has it; in mergekit's save order (sorted by name)."""
    anchor = models[recipe.base_model or recipe.inputs[0]]
    names = set(anchor.tensors)
    if any(f.has(LM_HEAD) for f in models.values()):
        names.add(LM_HEAD)
    return sorted(names)


def plan_merge(
    recipe: Recipe, folders: Mapping[str, str | Path], out_shard_size: int = DEFAULT_SHARD_SIZE
) -> Plan:
    """Decide every output tensor's inputs, dtype and shard from the input headers alone."""
    models = open_models(recipe, folders)
    anchor = models[recipe.base_model or recipe.inputs[0]]
    num_layers = _num_layers(anchor) or 1 + max(
        (int(m.group(1)) for n in anchor.tensors if (m := _LAYER_RE.search(n))), default=0
    )
    tensors: dict[str, TensorPlan] = {}
    for name in output_names(recipe, models):
        sources = _sources(name, models, recipe)
        shape = _check_shapes(name, models, sources, recipe.base_model or recipe.inputs[0])
        infos = [(ref, models[ref].info(src).dtype) for ref, src in sources.items() if src]
        base_dtype = (models[recipe.base_model].info(sources[recipe.base_model]).dtype
                      if recipe.base_model and sources.get(recipe.base_model) else None)
        compute = _compute_dtype(recipe, infos, base_dtype)
        out = ST_NAMES[recipe.out_dtype or compute]
        t = gradient_t(name, num_layers, recipe.version)
        tensors[name] = TensorPlan(name, shape, compute, out, t, sources)
    plan = Plan(
        version=recipe.version, method=recipe.method.name, base_model=recipe.base_model,
        models={ref: str(folders[ref]) for ref in recipe.inputs}, dtype=recipe.dtype,
        out_dtype=recipe.out_dtype, shards=cut_shards(tensors.values(), out_shard_size),
        tensors=tensors,
    )
    for ref, folder in models.items():
        folder.close()
    return plan


# --- merging -------------------------------------------------------------------------------


def merge_tensor(
    recipe: Recipe, tensor: TensorPlan, models: Mapping[str, ModelFolder], seed: int = 0,
    pool: Executor | None = None,
) -> "torch.Tensor":
    """Compute one output tensor; inputs are read when needed (mapped, not copied) and
    dropped after use."""
    from remerge.merge.tensor_ops import linear, task_arithmetic_streamed, tensor_seed

    compute = torch_dtype(tensor.compute_dtype)
    present = [ref for ref, src in tensor.sources.items() if src]
    mergers = [ref for ref in recipe.mergers if ref in present]
    shared, per_model = tensor_parameters(recipe, tensor.name, tensor.t, mergers)

    def load(ref: str) -> "torch.Tensor":
        return models[ref].view(tensor.sources[ref]).to(compute)

    method = recipe.method
    if method.linear:
        weights = [per_model[ref]["weight"] for ref in mergers]
        result = linear([load(ref) for ref in mergers], weights, shared["normalize"], recipe.version)
    else:
        seeds = [tensor_seed(seed, tensor.name, recipe.inputs.index(ref)) for ref in mergers]
        result = task_arithmetic_streamed(
            method, partial(load, recipe.base_model), [partial(load, ref) for ref in mergers],
            [per_model[ref] for ref in mergers], shared, recipe.version, seeds, pool,
        )
    return result.to(torch_dtype(tensor.dtype))


def plain_inputs(recipe: Recipe, tensor: TensorPlan, models: Mapping[str, ModelFolder]) -> list[str] | None:
    """The merged models of a tensor when its whole computation is `base + (x - base)` in
    bf16 (at most one merged model, weight exactly 1, nothing sparsified, no lambda, bf16 in
    and out, as the seed's recipe): the torch-free fused path. None otherwise."""
    if recipe.method.linear or tensor.compute_dtype != "bfloat16" or tensor.dtype != "BF16":
        return None
    present = [ref for ref, src in tensor.sources.items() if src]
    if any(models[ref].info(tensor.sources[ref]).dtype != "BF16" for ref in present):
        return None
    mergers = [ref for ref in recipe.mergers if ref in present]
    if len(mergers) > 1:
        return None
    shared, per_model = tensor_parameters(recipe, tensor.name, tensor.t, mergers)
    if shared.get("lambda", 1.0) != 1:
        return None
    for p in per_model.values():
        if p["weight"] != 1.0 or (recipe.method.sparsification is not None and p.get("density", 1.0) < 1):
            return None
    return mergers


def merge_plain(recipe: Recipe, tensor: TensorPlan, models: Mapping[str, ModelFolder],
                mergers: list[str], pool: Executor | None) -> "numpy.ndarray | None":
    """A plain tensor's bytes from the fused kernel (no torch); None if a difference is not
    finite (then the step-by-step path decides, as mergekit's arithmetic would)."""
    base = models[recipe.base_model].raw(tensor.sources[recipe.base_model])
    if not mergers:
        return base  # no merged model has this tensor: mergekit returns the base's
    x = models[mergers[0]].raw(tensor.sources[mergers[0]])
    return native.plain_difference_raw(x, base, pool)


def merge_shard(
    plan: Plan, recipe: Recipe, index: int, out_path: str | Path, threads: int | None = None,
    seed: int = 0, digests: bool = False,
) -> dict[str, str] | None:
    """Write output shard `index` of the plan to `out_path` (atomically), tensor by tensor.

    Returns the sha256 of every tensor's bytes when `digests` is set."""
    plan.check_recipe(recipe)
    native.tame_malloc()
    if not 0 <= index < len(plan.shards):
        raise RecipeError(f"shard {index + 1} does not exist: the plan has {len(plan.shards)}")
    models = {ref: ModelFolder(path, label=ref) for ref, path in plan.models.items()}
    names = plan.shards[index]
    layout = [(n, plan.tensors[n].dtype, plan.tensors[n].shape) for n in names]
    started = time.monotonic()
    # The pool runs sparsification sorts (one per merged model) and the fused kernel's halves;
    # the writer has its own thread, so computing tensor i+1 overlaps writing tensor i.
    workers = max(1, threads or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            ShardWriter(out_path, layout, metadata={"format": "pt"}, digests=digests) as writer:
        for i, name in enumerate(names, 1):
            tensor = plan.tensors[name]
            if tensor.nbytes >= LARGE_TENSOR_BYTES:
                writer.wait()  # a large working set: do not hold the previous result too
            mergers = plain_inputs(recipe, tensor, models)
            data = merge_plain(recipe, tensor, models, mergers, pool) if mergers is not None else None
            if data is not None:
                writer.write_raw(name, data)
            else:
                _set_torch_threads(threads)
                writer.write(name, merge_tensor(recipe, tensor, models, seed, pool))
            log.debug("shard %d: %d/%d %s", index + 1, i, len(names), name)
    log.info("wrote %s (%d tensors, %.1f MB) in %.1fs", out_path, len(names),
             plan.shard_bytes(index) / 1e6, time.monotonic() - started)
    return writer.digests


def _set_torch_threads(threads: int | None) -> None:
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def merge_model(
    recipe: Recipe, folders: Mapping[str, str | Path], out_dir: str | Path,
    out_shard_size: int = DEFAULT_SHARD_SIZE, threads: int | None = None, seed: int = 0,
) -> Plan:
    """The whole model folder, as `mergekit-yaml` writes it, built in a hidden staging folder
    and moved into `out_dir` only when complete (config.json last): a failed or killed run
    leaves no file that looks like a finished model."""
    from remerge.merge.model_files import mergekit_card, start_transformers_import, write_merge_files

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".remerge-partial-*"):  # left by a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    staging = out_dir / f".remerge-partial-{os.getpid()}"
    staging.mkdir()
    if recipe.version != LEGACY:  # config.json needs transformers (seconds to import): start now
        start_transformers_import()
    try:
        plan = plan_merge(recipe, folders, out_shard_size)
        for i, name in enumerate(plan.shard_names):
            log.info("shard %d/%d: %s", i + 1, len(plan.shards), name)
            merge_shard(plan, recipe, i, staging / name, threads=threads, seed=seed)
        write_index(plan, staging)
        write_bytes_atomic(staging / "mergekit_config.yml", recipe.text.encode("utf-8"))
        write_bytes_atomic(staging / "README.md", mergekit_card(recipe, out_dir.name).encode("utf-8"))
        write_merge_files(recipe, folders, staging)
        last = [p for p in ("config.json",) if (staging / p).exists()]
        for item in sorted(staging.iterdir(), key=lambda p: p.name in last):
            shutil.move(str(item), out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return plan
