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
import shutil
import re
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from queue import Queue
from typing import Iterator, Mapping, Sequence

import torch

from remerge import native
from remerge.errors import ModelError, RecipeError
from remerge.methods import LEGACY
from remerge.tensor_ops import linear, task_arithmetic_streamed, tensor_seed
from remerge.recipe import Recipe, tensor_parameters
from remerge.layout import INDEX_NAME
from remerge.plan import DEFAULT_SHARD_SIZE, Plan, TensorPlan, cut_shards, write_index
from remerge.safetensors_io import (
    DTYPES, ST_NAMES, TORCH_NAMES, ModelFolder, ShardWriter,
)
from remerge.files import write_bytes_atomic

log = logging.getLogger(__name__)

LM_HEAD = "lm_head.weight"
LARGE_TENSOR_BYTES = 32 * 1024**2
PREFETCH_BYTES = 64 * 1024**2  # inputs of one tensor read ahead at most
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


def _compute_dtype(recipe: Recipe, infos: Sequence[tuple[str, str]], base_dtype: str | None) -> str:
    """Recipe dtype, else the base's (0.0.5.1 casts inputs to it), else the promoted type."""
    if recipe.dtype:
        return recipe.dtype
    if recipe.version == LEGACY and base_dtype is not None:
        return _torch_name(DTYPES[base_dtype])
    dtype = DTYPES[infos[0][1]]
    for _, st in infos[1:]:
        dtype = torch.promote_types(dtype, DTYPES[st])
    return _torch_name(dtype)


def _torch_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        out = ST_NAMES[TORCH_NAMES[recipe.out_dtype or compute]]
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
    pool: Executor | None = None, prefetched: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Compute one output tensor; inputs are read when needed (or taken from `prefetched`,
    once each) and dropped after use."""
    compute = TORCH_NAMES[tensor.compute_dtype]
    present = [ref for ref, src in tensor.sources.items() if src]
    mergers = [ref for ref in recipe.mergers if ref in present]
    shared, per_model = tensor_parameters(recipe, tensor.name, tensor.t, mergers)
    ready = dict(prefetched or {})

    def load(ref: str) -> torch.Tensor:
        raw = ready.pop(ref, None)
        return (raw if raw is not None else models[ref].load(tensor.sources[ref])).to(compute)

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
    return result.to(DTYPES[tensor.dtype])


def prefetch(plan: Plan, names: list[str], models: Mapping[str, ModelFolder],
             limit: int = PREFETCH_BYTES) -> Iterator[dict[str, torch.Tensor] | None]:
    """The inputs of each tensor in turn, read one tensor ahead on a background thread, so
    reading overlaps computing. Tensors whose inputs exceed `limit` bytes are not read ahead
    (None: the caller reads them), which bounds the extra memory."""
    queue: Queue = Queue(maxsize=1)

    def read_ahead() -> None:
        try:
            for name in names:
                t = plan.tensors[name]
                refs = [ref for ref, src in t.sources.items() if src]
                size = sum(models[ref].info(t.sources[ref]).nbytes for ref in refs)
                queue.put({ref: models[ref].load(t.sources[ref]) for ref in refs} if size <= limit else None)
        except BaseException as err:  # the caller reads for itself and meets the error there
            queue.put(err)

    threading.Thread(target=read_ahead, name="prefetch", daemon=True).start()
    for _ in names:
        item = queue.get()
        yield None if isinstance(item, BaseException) else item


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
    if threads:
        torch.set_num_threads(threads)
    models = {ref: ModelFolder(path, label=ref) for ref, path in plan.models.items()}
    names = plan.shards[index]
    layout = [(n, plan.tensors[n].dtype, plan.tensors[n].shape) for n in names]
    started = time.monotonic()
    # Sparsification sorts run on this pool (one per merged model); the writer runs on its own
    # thread, so computing tensor i+1 overlaps writing tensor i.
    workers = threads or torch.get_num_threads()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            ShardWriter(out_path, layout, metadata={"format": "pt"}, digests=digests) as writer:
        for i, (name, ready) in enumerate(zip(names, prefetch(plan, names, models)), 1):
            if plan.tensors[name].nbytes >= LARGE_TENSOR_BYTES:
                writer.wait()  # a large working set: do not hold the previous result too
            writer.write(name, merge_tensor(recipe, plan.tensors[name], models, seed, pool, ready))
            log.debug("shard %d: %d/%d %s", index + 1, i, len(names), name)
    log.info("wrote %s (%d tensors, %.1f MB) in %.1fs", out_path, len(names),
             plan.shard_bytes(index) / 1e6, time.monotonic() - started)
    return writer.digests


def merge_model(
    recipe: Recipe, folders: Mapping[str, str | Path], out_dir: str | Path,
    out_shard_size: int = DEFAULT_SHARD_SIZE, threads: int | None = None, seed: int = 0,
) -> Plan:
    """The whole model folder, as `mergekit-yaml` writes it, built in a hidden staging folder
    and moved into `out_dir` only when complete (config.json last): a failed or killed run
    leaves no file that looks like a finished model."""
    from remerge.configs import mergekit_card, write_merge_files

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".remerge-partial-*"):  # left by a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    staging = out_dir / f".remerge-partial-{os.getpid()}"
    staging.mkdir()
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
