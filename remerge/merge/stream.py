"""The streaming loop: one output shard, one tensor (or one chunk of rows) at a time.

A shard job keeps the working set of one chunk (rows of each input, the stacked task vectors
and the result; the whole tensor for tasks that are not elementwise, see
`remerge.merge.tensor.choose_chunk_rows`) and writes each result straight to its offset in
the output file, so its memory grows neither with the shard nor, for elementwise tasks, with
the tensor. Computing chunk i+1 overlaps writing chunk i (the writer has its own thread).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from remerge.errors import RecipeError
from remerge.io.safetensors import ShardWriter
from remerge.merge.kernels import native
from remerge.merge.plan import Plan
from remerge.merge.recipe import Recipe
from remerge.merge.tensor import METHOD, merge_chunks, plan_tensor, use_torch_threads

log = logging.getLogger(__name__)

# Before a tensor (or chunk) this large, wait until the previous results are written (and
# freed). Chunks are smaller (`remerge.merge.tensor.CHUNK_ELEMENTS`): the writer's queue alone
# bounds them.
LARGE_TENSOR_BYTES = 32 * 1024**2


def merge_shard(
    plan: Plan, recipe: Recipe, index: int, out_path: str | Path, threads: int | None = None,
    seed: int = 0, digests: bool = False,
) -> dict[str, str] | None:
    """Write output shard `index` of the plan to `out_path` (atomically), tensor by tensor.

    Returns the sha256 of every tensor's bytes when `digests` is set."""
    plan.check_recipe(recipe)
    if not 0 <= index < len(plan.shards):
        raise RecipeError(f"shard {index + 1} does not exist: the plan has {len(plan.shards)}")
    native.tame_malloc()
    models = plan.open_models()
    tasks = [plan_tensor(recipe, plan.tensors[name], seed) for name in plan.shards[index]]
    if any(task.kernel == METHOD for task in tasks):
        use_torch_threads(threads)
    layout = [(task.name, task.dtype, task.shape) for task in tasks]
    started = time.monotonic()
    # The pool runs sparsification sorts (one per merged model) and the fused kernel's halves.
    workers = max(1, threads or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            ShardWriter(out_path, layout, metadata={"format": "pt"}, digests=digests) as writer:
        for i, task in enumerate(tasks, 1):
            if task.chunk_nbytes >= LARGE_TENSOR_BYTES:
                writer.wait()  # a large working set: do not hold the previous result too
            for start, data in merge_chunks(task, models, pool):
                writer.write_raw(task.name, data, start)
            log.debug("shard %d: %d/%d %s", index + 1, i, len(tasks), task.name)
    for folder in models.values():
        folder.close()
    log.info("wrote %s (%d tensors, %.1f MB) in %.1fs", out_path, len(tasks),
             plan.shard_bytes(index) / 1e6, time.monotonic() - started)
    return writer.digests
