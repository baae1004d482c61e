"""Big tensors in chunks of rows: which tasks are cut, and that a chunked tensor's bytes are the
whole computation's, for every elementwise method, dtype and odd chunk size; rows read from
the files; shards written in pieces; the shard job's declared memory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from remerge.cli import main
from remerge.io.safetensors import ModelFolder, ShardWriter, row_span
from remerge.merge import tensor as tensor_module
from remerge.merge.plan import plan_merge
from remerge.merge.recipe import parse_recipe
from remerge.merge.tensor import (
    PLAIN_DIFFERENCE, chunk_ranges, choose_chunk_rows, merge_chunks, merge_tensor, plan_tensor,
)
from remerge.workflow.config import BASELINE_MB, shard_mem_mb

# Odd shapes: chunks of k rows start at elements that are no multiple of a vector width.
SHAPES = {
    "model.embed_tokens.weight": (37, 13),
    "model.layers.0.self_attn.q_proj.weight": (13, 13),
    "model.layers.0.mlp.up_proj.weight": (41, 11),
    "model.layers.0.mlp.down_proj.weight": (40, 64),
    "model.layers.0.input_layernorm.weight": (29,),
    "model.norm.weight": (13,),
    "lm_head.weight": (37, 13),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def tensors(seed: int, dtype: torch.dtype, base: dict | None = None,
            shapes: dict = SHAPES) -> dict[str, torch.Tensor]:
    """Values of many scales, exact zeros in the task vectors, signs that disagree between
    models; all finite."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        scale = torch.tensor([1e-6, 1e-2, 1.0, 1e3])[torch.randint(0, 4, shape, generator=g)]
        values = torch.randn(shape, generator=g) * scale
        if base is not None:
            keep = torch.rand(shape, generator=g) < 0.8
            values = base[name].float() + values * keep
        out[name] = values.to(dtype)
    return out


def write(folder: Path, data: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(data, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": 13, "vocab_size": 37, "tie_word_embeddings": False}))
    return folder


@pytest.fixture(scope="module", params=list(DTYPES))
def models(request, tmp_path_factory):
    """A base and three fine-tunes stored in one dtype."""
    root = tmp_path_factory.mktemp(f"chunks-{request.param}")
    dtype = DTYPES[request.param]
    base = tensors(0, dtype)
    write(root / "base", base)
    for i, name in enumerate("abc", 1):
        write(root / name, tensors(i, dtype, base))
    return root


def recipe_text(root: Path, method: str, per_model: list[str], shared: str, dtype: str,
                base: bool = True) -> str:
    lines = ["models:"]
    for name, params in zip("abc", per_model):
        lines += [f"  - model: {root / name}", f"    parameters: {{{params}}}"]
    lines.append(f"merge_method: {method}")
    if base:
        lines.append(f"base_model: {root / 'base'}")
    if shared:
        lines.append(f"parameters: {{{shared}}}")
    lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"


# (method, per-model parameters, global parameters, releases): every elementwise case
ELEMENTWISE = [
    ("ties", ["weight: 1, density: 1"], "normalize: true, int8_mask: true", ("0.0.5.1", "0.1.5")),
    ("ties", ["weight: 0.7, density: 1", "weight: 0.3", "weight: 0.45"], "normalize: true",
     ("0.0.5.1", "0.1.5")),
    ("ties", ["weight: 0.7", "weight: 1.3"], "normalize: false, int8_mask: true", ("0.1.5",)),
    ("task_arithmetic", ["weight: 0.6", "weight: 0.4", "weight: -0.2"], "", ("0.0.5.1",)),
    ("task_arithmetic", ["weight: 0.6", "weight: 0.4"], "lambda: 0.8, normalize: true", ("0.1.5",)),
    ("dare_ties", ["weight: 0.5, density: 1", "weight: 0.5, density: 1"], "rescale: true", ("0.1.5",)),
    ("dare_linear", ["weight: 0.5, density: 1", "weight: 0.25, density: 1"], "", ("0.1.5",)),
    ("della", ["weight: 0.5, density: 1", "weight: 0.5, density: 1"], "lambda: 1.1", ("0.1.5",)),
    ("della_linear", ["weight: 0.5, density: 1"] * 3, "", ("0.1.5",)),
    ("breadcrumbs_ties", ["weight: 0.5, density: 1", "weight: 0.5, density: 1"], "", ("0.1.5",)),
    ("linear", ["weight: 0.6", "weight: 0.3", "weight: 0.1"], "", ("0.0.5.1", "0.1.5")),
    ("linear", ["weight: 2", "weight: 0.3"], "normalize: false", ("0.0.5.1", "0.1.5")),
]
CASES = [(m, p, s, v) for m, p, s, vs in ELEMENTWISE for v in vs]


def tasks_of(root: Path, text: str, version: str):
    recipe = parse_recipe(text, version=version)
    plan = plan_merge(recipe, {ref: Path(ref) for ref in recipe.inputs})
    return plan, [plan_tensor(recipe, t, seed=3) for t in plan.tensors.values()]


@pytest.mark.parametrize("compute", list(DTYPES))
@pytest.mark.parametrize("method,per_model,shared,version", CASES,
                         ids=[f"{m}-{len(p)}-{v}" for m, p, _, v in CASES])
def test_chunked_bytes_equal_the_whole_computation(models, method, per_model, shared, version, compute):
    text = recipe_text(models, method, per_model, shared, compute, base=method != "linear")
    plan, tasks = tasks_of(models, text, version)
    folders = plan.open_models()
    for task in tasks:
        assert task.method.is_elementwise(task), task.name
        whole = merge_tensor(replace(task, chunk_rows=None), folders)
        for rows in (1, 2, 5, 7, task.shape[0] - 1):
            chunked = replace(task, chunk_rows=max(1, rows))
            pieces = list(merge_chunks(chunked, folders))
            assert len(pieces) == len(chunk_ranges(chunked)) > 1 or task.shape[0] <= 2
            assert [start for start, _ in pieces] == [row_span(task.shape, r)[0] for r in chunk_ranges(chunked)]
            joined = np.concatenate([data for _, data in pieces])
            assert joined.dtype == whole.dtype and np.array_equal(joined, whole), (task.name, rows)


def test_chunks_with_non_finite_values(tmp_path):
    """The seed's fused kernel, chunk by chunk: a chunk with an inf or NaN difference takes
    the method's arithmetic for its rows alone. In chunks as `choose_chunk_rows` cuts them
    (aligned), every byte is the whole path's, NaNs included; in unaligned chunks the finite
    values and the NaN positions still are, but a NaN's sign and payload may not be (torch's
    vector and one-by-one loops make different NaNs)."""
    shapes = {"model.embed_tokens.weight": (2100, 13), "model.norm.weight": (13,)}
    base = tensors(0, torch.bfloat16, shapes=shapes)
    x = tensors(1, torch.bfloat16, base, shapes=shapes)
    name = "model.embed_tokens.weight"
    for row in (4, 1500, 2090):  # one chunk each
        base[name][row, 3], x[name][row, 3] = float("inf"), float("inf")  # inf - inf = NaN
        x[name][row + 2, 0] = float("nan")
        base[name][row + 5, 5], x[name][row + 5, 5] = -3e38, 3e38  # the difference overflows
    write(tmp_path / "base", base)
    write(tmp_path / "a", x)
    plan, tasks = tasks_of(tmp_path, SEED_RECIPE.format(a=tmp_path / "a", base=tmp_path / "base"), "0.0.5.1")
    folders = plan.open_models()
    task = next(t for t in tasks if t.name == name)
    assert task.kernel == PLAIN_DIFFERENCE
    whole = merge_tensor(replace(task, chunk_rows=None), folders)
    nan = (whole & 0x7FFF) > 0x7F80
    assert nan.sum() == 6 and ((whole & 0x7FFF) == 0x7F80).sum() == 3
    aligned = replace(task, chunk_rows=choose_chunk_rows(task, 5000))
    assert aligned.chunk_rows == 1024 and len(chunk_ranges(aligned)) == 3
    assert np.array_equal(merge_tensor(aligned, folders), whole)
    for rows in (1, 3, 700):
        odd = merge_tensor(replace(task, chunk_rows=rows), folders)
        assert np.array_equal((odd & 0x7FFF) > 0x7F80, nan)
        assert np.array_equal(odd[~nan], whole[~nan])


def test_which_tasks_are_cut(models):
    """Elementwise tasks larger than the budget, in runs of whole rows that start at multiples
    of CHUNK_ALIGN elements; anything that needs the whole tensor (a magnitude cut, a random
    draw, slerp's norms, model_stock's angles) is not cut."""
    def task(method, per_model, shared="", base=True, name="model.layers.0.mlp.down_proj.weight"):
        text = recipe_text(models, method, per_model, shared, "bfloat16", base=base)
        _, found = tasks_of(models, text, "0.1.5")
        return next(t for t in found if t.name == name)

    assert tensor_module.CHUNK_ALIGN == 1024
    ties = task("ties", ["weight: 1, density: 1"] * 2)  # (40, 64): 16 rows are 1024 elements
    assert choose_chunk_rows(ties, 40 * 64) is None  # fits the budget: all at once
    assert choose_chunk_rows(ties, 40 * 64 - 1) == 32
    assert choose_chunk_rows(ties, 20 * 64) == 16
    assert choose_chunk_rows(ties, 5) == 16  # never fewer rows than an aligned run
    narrow = task("ties", ["weight: 1, density: 1"] * 2, name="model.layers.0.mlp.up_proj.weight")
    assert choose_chunk_rows(narrow, 25) is None  # (41, 11): an aligned run is 1024 rows
    assert choose_chunk_rows(task("linear", ["weight: 1", "weight: 2"], base=False), 20 * 64) == 16
    assert choose_chunk_rows(task("task_arithmetic", ["weight: 1", "weight: 2"], "lambda: 0.5"), 5) == 16
    for whole in (task("ties", ["weight: 1, density: 0.5"] * 2),
                  task("ties", ["weight: 1, density: 1", "weight: 1, density: 0.9"]),
                  task("dare_ties", ["weight: 1, density: 0.7"] * 2),
                  task("della", ["weight: 1, density: 0.7"] * 2),
                  task("breadcrumbs", ["weight: 1, density: 0.9"] * 2),
                  task("slerp", ["weight: 1"], "t: 0.5"),
                  task("model_stock", ["weight: 1"] * 2)):
        assert choose_chunk_rows(whole, 5) is None, whole.method.name
    assert ties.chunk_rows is None and ties.chunk_numel == 40 * 64  # the real budget: whole
    assert replace(ties, chunk_rows=7).chunk_numel == 7 * 64
    assert replace(ties, chunk_rows=7).chunk_nbytes == 7 * 64 * 2
    assert chunk_ranges(replace(ties, chunk_rows=16)) == [(0, 16), (16, 32), (32, 40)]


def test_rows_are_read_from_the_files_for_that_range(models):
    folder = ModelFolder(models / "a")
    for name, shape in SHAPES.items():
        whole, raw = folder.view(name), folder.raw(name)
        for rows in ((0, 1), (3, 7), (shape[0] - 1, shape[0]), (2, 2), (0, shape[0])):
            assert torch.equal(folder.view(name, rows), whole[rows[0]:rows[1]])
            first, count, _ = row_span(shape, rows)
            assert np.array_equal(folder.raw(name, rows), raw[first:first + count])
        with pytest.raises(ValueError):
            folder.view(name, (3, shape[0] + 1))
    folder.close()


def layout_and_data():
    g = torch.Generator().manual_seed(0)
    data = {"big": torch.randn(31, 7, generator=g).bfloat16(), "f": torch.randn(5, generator=g),
            "empty": torch.zeros(0, 3, dtype=torch.bfloat16)}
    layout = [(n, {torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype], tuple(t.shape)) for n, t in data.items()]
    return layout, data


def flat(t: torch.Tensor) -> np.ndarray:
    width = {2: np.uint16, 4: np.uint32}[t.element_size()]
    return t.contiguous().reshape(-1).view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().view(width)


def test_a_tensor_written_in_pieces_is_the_same_file_and_digest(tmp_path):
    layout, data = layout_and_data()
    save_file(data, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    with ShardWriter(tmp_path / "out.safetensors", layout, metadata={"format": "pt"}, digests=True) as w:
        big = flat(data["big"])
        w.write_raw("f", flat(data["f"]))
        for start in range(0, big.size, 3 * 7 + 2):  # odd pieces, not whole rows
            w.write_raw("big", big[start:start + 23], start)
        w.write_raw("empty", flat(data["empty"]))
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    for name, t in data.items():
        assert w.digests[name] == hashlib.sha256(flat(t).tobytes()).hexdigest()
    assert load_file(tmp_path / "out.safetensors")["big"].equal(data["big"])


def test_pieces_out_of_order_twice_or_missing_are_refused(tmp_path):
    layout, data = layout_and_data()
    big = flat(data["big"])
    path = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="tensors never written in full: \\['big'\\]"):
        with ShardWriter(path, layout) as w:
            w.write_raw("f", flat(data["f"]))
            w.write_raw("empty", flat(data["empty"]))
            w.write_raw("big", big[:10])
            with pytest.raises(ValueError, match="from element 20"):
                w.write_raw("big", big[20:30], 20)  # a gap
            with pytest.raises(ValueError, match="from element 0"):
                w.write_raw("big", big[:10])  # overlaps
            with pytest.raises(ValueError, match="planned 434 bytes"):
                w.write_raw("big", big[10:], 10 - 1)
            with pytest.raises(ValueError, match="twice"):
                w.write_raw("f", flat(data["f"]))
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing that looks complete


SEED_RECIPE = """\
models:
  - model: {a}
    parameters: {{weight: 1, density: 1}}
  - model: {a}
    parameters: {{weight: 1, density: 1}}
merge_method: ties
base_model: {base}
parameters: {{density: 1, normalize: true, int8_mask: true}}
dtype: bfloat16
"""


@pytest.mark.parametrize("text", [SEED_RECIPE, SEED_RECIPE.replace("weight: 1,", "weight: 0.7,", 1)],
                         ids=["plain-difference", "ties"])
def test_a_merge_in_chunks_writes_the_same_shards_and_digests(models, tmp_path, monkeypatch, text):
    """`remerge merge` and a shard job with a tiny chunk budget: the same files as with the
    tensors whole, and tensors.json's digests are the sha256 of each whole tensor."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text.format(a=models / "a", base=models / "base"))
    args = ["--mergekit-version", "0.0.5.1", "--out-shard-size", "2K"]
    whole, chunked = tmp_path / "whole" / "out", tmp_path / "chunked" / "out"  # the card names it
    assert main(["merge", str(recipe), str(whole), *args]) == 0
    pieces = []
    original = ShardWriter.write_raw
    monkeypatch.setattr(ShardWriter, "write_raw",
                        lambda self, name, data, start=0: (pieces.append(name), original(self, name, data, start)))
    monkeypatch.setattr(tensor_module, "CHUNK_ELEMENTS", 20)
    monkeypatch.setattr(tensor_module, "CHUNK_ALIGN", 1)  # finite values: any chunks do
    assert main(["merge", str(recipe), str(chunked), *args]) == 0
    assert len(pieces) > 3 * len(SHAPES)  # most tensors went in several pieces
    files = sorted(p.name for p in whole.iterdir())
    assert files == sorted(p.name for p in chunked.iterdir())
    for f in files:
        assert (whole / f).read_bytes() == (chunked / f).read_bytes(), f

    from remerge.stages import stage_shard

    parsed = parse_recipe(recipe.read_text(), version="0.0.5.1")
    plan = plan_merge(parsed, {ref: Path(ref) for ref in parsed.inputs}, out_shard_size=2000)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.to_json())
    for name in plan.shard_names:
        stage_shard(plan_path, recipe.read_text(), "0.0.5.1", tmp_path / name, tmp_path / f"{name}.json")
        assert (tmp_path / name).read_bytes() == (whole / name).read_bytes()
        digests = json.loads((tmp_path / f"{name}.json").read_text())
        merged = load_file(tmp_path / name)
        assert digests == {n: hashlib.sha256(flat(t).tobytes()).hexdigest() for n, t in merged.items()}


def test_declared_memory_counts_a_chunk_of_a_chunked_task(tmp_path):
    """A plan at Llama-3.1-8B's embedding size: TIES at density 1 counts one chunk of rows, a
    density below 1 (or no recipe) the whole tensor."""
    vocab, hidden = 128256, 4096
    plan = {
        "version": "0.1.5", "method": "ties", "base_model": "/m/base",
        "models": {"/m/base": "/m/base", "/m/a": "/m/a", "/m/b": "/m/b"}, "dtype": "bfloat16",
        "out_dtype": None, "shards": [["model.embed_tokens.weight", "model.norm.weight"]],
        "tensors": [
            {"name": "model.embed_tokens.weight", "shape": [vocab, hidden], "compute_dtype": "bfloat16",
             "dtype": "BF16", "t": 0.0, "sources": {m: "model.embed_tokens.weight" for m in ("/m/base", "/m/a", "/m/b")},
             "stored": {m: "BF16" for m in ("/m/base", "/m/a", "/m/b")}},
            {"name": "model.norm.weight", "shape": [hidden], "compute_dtype": "bfloat16", "dtype": "BF16",
             "t": 1.0, "sources": {m: "model.norm.weight" for m in ("/m/base", "/m/a", "/m/b")},
             "stored": {m: "BF16" for m in ("/m/base", "/m/a", "/m/b")}},
        ],
    }
    shard = "model.safetensors"
    per_element = 2 * (2 * 2 + 1) + 2 * 2 + 8  # two merged models, bf16
    text = """\
models:
  - model: /m/a
    parameters: {{weight: 0.5, density: {d}}}
  - model: /m/b
    parameters: {{weight: 0.5, density: 1}}
merge_method: ties
base_model: /m/base
dtype: bfloat16
"""
    whole = int(BASELINE_MB + vocab * hidden * per_element / 1e6) + 1
    chunk_rows = tensor_module.CHUNK_ELEMENTS // hidden
    chunked = int(BASELINE_MB + chunk_rows * hidden * per_element / 1e6) + 1
    assert shard_mem_mb(plan, shard) == whole
    assert shard_mem_mb(plan, shard, recipe=text.format(d=0.5), version="0.1.5") == whole
    assert shard_mem_mb(plan, shard, recipe=text.format(d=1), version="0.1.5") == chunked < 1000
    retried = int((BASELINE_MB + chunk_rows * hidden * per_element / 1e6) * 1.5) + 1
    assert shard_mem_mb(plan, shard, 2, recipe=text.format(d=1), version="0.1.5") == retried


def test_fused_difference_equals_torch_on_every_bf16_value():
    """The seed's kernel (vectorized) against torch's `base + (x - base)`: every bf16 bit
    pattern as x, against bases of every magnitude; a non-finite difference is reported."""
    from remerge.merge.kernels import native

    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    for scale in (1e-39, 1e-3, 1.0, 3e38):
        base = (torch.randn(x.numel(), generator=g) * scale).bfloat16()
        expected = base + (x - base)
        finite = torch.isfinite(x - base)
        out = native.plain_difference_raw(flat(x), flat(base))
        assert out is None  # x holds every inf and NaN
        xs, bs = x[finite].contiguous(), base[finite].contiguous()
        out = native.plain_difference_raw(flat(xs), flat(bs))
        assert out is not None and np.array_equal(out, flat(expected[finite].contiguous()))
