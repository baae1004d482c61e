"""The streaming merge engine end to end on tiny models, and its failures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from remerge.cli import main
from remerge.merge.methods.task_arithmetic import Steps, reference
from remerge.merge.releases import get_release
from tinymodels import TIES_RECIPE as RECIPE, finetune, random_tensors, write_model



@pytest.fixture()
def models(tmp_path):
    base = random_tensors(0)
    write_model(tmp_path / "base", base, shards=3)
    write_model(tmp_path / "a", finetune(base, 1))
    write_model(tmp_path / "b", finetune(base, 2), shards=2)
    return tmp_path


def run_merge(tmp_path, text, *args, name="recipe.yml"):
    path = tmp_path / name
    path.write_text(text)
    return main(["merge", str(path), str(tmp_path / "out"), *args])


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def fill(models, **kw):
    return RECIPE.format(a=models / "a", b=models / "b", base=models / "base", **kw)


def test_merge_writes_a_complete_sharded_model(models):
    assert run_merge(models, fill(models), "--out-shard-size", "2K") == 0
    out = models / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    merged = read_all(out)
    base = read_all(models / "base")
    assert set(merged) == set(base)
    assert all(merged[n].dtype == torch.bfloat16 and merged[n].shape == base[n].shape for n in base)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in merged.values())
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert (out / "mergekit_config.yml").read_text() == fill(models)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"  # mergekit 0.1.5 runs on transformers 5: `dtype`
    assert (out / "README.md").read_text().startswith("---\nbase_model: []\n")
    assert not list(out.glob(".*"))  # no staging or temporary files left


def test_config_json_waits_for_transformers_when_the_merge_outruns_its_import(models):
    """A fresh `remerge merge` process imports transformers in the background while it merges;
    a tiny merge ends first, and config.json must still be transformers' serialization (a
    half-imported module once made it fall back to the donor's bare keys)."""
    from transformers import AutoConfig

    recipe = models / "recipe.yml"
    recipe.write_text(fill(models))
    proc = subprocess.run([sys.executable, "-m", "remerge", "merge", str(recipe), str(models / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "transformers cannot load" not in proc.stderr
    expected = AutoConfig.from_pretrained(models / "base")
    expected.torch_dtype = "bfloat16"
    assert (models / "out" / "config.json").read_text() == expected.to_json_string()


def test_merge_equals_the_arithmetic_tensor_by_tensor(models):
    assert run_merge(models, fill(models)) == 0
    merged = read_all(models / "out")
    base, a, b = (read_all(models / m) for m in ("base", "a", "b"))
    name = "model.layers.1.mlp.up_proj.weight"  # layer 1 of 3: t = 0.5 -> b's density 0.55
    shared = {"int8_mask": True, "normalize": True, "rescale": False, "lambda": 1.0}
    params = [{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.2 * 0.5 + 0.9 * 0.5}]
    expected = reference(Steps("magnitude", True), base[name], [a[name], b[name]], params, shared,
                         get_release("0.1.5"), [0, 0])
    assert torch.equal(merged[name], expected)


def test_threads_do_not_change_a_byte(models):
    for threads in ("1", "8"):
        assert run_merge(models, fill(models), "--threads", threads) == 0
        (models / "out").rename(models / f"out{threads}")
    files = sorted(p.name for p in (models / "out1").iterdir())
    assert files == sorted(p.name for p in (models / "out8").iterdir())
    for f in files:
        assert (models / "out1" / f).read_bytes() == (models / "out8" / f).read_bytes()


def test_tied_embeddings(tmp_path):
    base = random_tensors(0, tied=True)
    write_model(tmp_path / "base", base, tied=True)
    write_model(tmp_path / "a", random_tensors(1))  # has lm_head
    write_model(tmp_path / "b", finetune(base, 2), tied=True)
    assert run_merge(tmp_path, fill(tmp_path)) == 0
    merged = read_all(tmp_path / "out")
    assert "lm_head.weight" in merged  # some input has it: written, others use embed_tokens


def test_tied_everywhere_writes_no_lm_head(tmp_path):
    base = random_tensors(0, tied=True)
    for name, seed in (("base", None), ("a", 1), ("b", 2)):
        write_model(tmp_path / name, base if seed is None else finetune(base, seed), tied=True)
    assert run_merge(tmp_path, fill(tmp_path)) == 0
    assert "lm_head.weight" not in read_all(tmp_path / "out")


def error_of(capsys, models, text, *args):
    code = run_merge(models, text, *args)
    err = capsys.readouterr().err
    assert code != 0
    out = models / "out"
    assert not out.exists() or not any(out.iterdir()), "a failed merge left files behind"
    return err


def test_shape_mismatch_names_tensor_models_and_files(models, capsys):
    t = load_file(models / "a" / "model.safetensors")
    t["model.norm.weight"] = torch.zeros(7, dtype=torch.bfloat16)
    save_file(t, models / "a" / "model.safetensors")
    err = error_of(capsys, models, fill(models))
    assert "tensor model.norm.weight: shape [7] in model" in err and str(models / "a") in err
    assert "model.safetensors" in err


def test_missing_tensor_names_tensor_model_and_file(models, capsys):
    t = load_file(models / "a" / "model.safetensors")
    del t["model.layers.2.mlp.down_proj.weight"]
    save_file(t, models / "a" / "model.safetensors")
    err = error_of(capsys, models, fill(models))
    assert "tensor model.layers.2.mlp.down_proj.weight is missing from model" in err
    assert str(models / "a") in err


def test_unknown_parameter_is_ignored_as_mergekit_does_and_bad_density(models, caplog):
    with caplog.at_level("WARNING"):
        assert run_merge(models, fill(models).replace("density: 0.5", "densty: 0.5")) == 0
    assert "unknown parameter `densty` for ties" in caplog.text and "did you mean `density`" in caplog.text
    ignored = read_all(models / "out")
    assert run_merge(models, fill(models).replace(", density: 0.5", "")) == 0  # as if not set
    assert all(torch.equal(ignored[k], v) for k, v in read_all(models / "out").items())


def test_bad_density(models, capsys):
    err = error_of(capsys, models, fill(models).replace("density: 0.5", "density: 1.5"))
    assert "density must be in (0, 1]" in err and str(models / "a") in err


def test_truncated_shard(models, capsys):
    shard = models / "b" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    err = error_of(capsys, models, fill(models))
    assert str(shard) in err and "truncated" in err


def test_garbage_header(models, capsys):
    shard = models / "a" / "model.safetensors"
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    err = error_of(capsys, models, fill(models))
    assert str(shard) in err and "not valid JSON" in err


def test_index_naming_a_missing_shard(models, capsys):
    (models / "base" / "model-00002-of-00003.safetensors").unlink()
    err = error_of(capsys, models, fill(models))
    assert "model-00002-of-00003.safetensors, which is missing" in err


def test_pickle_only_model_is_refused(models, capsys):
    (models / "a" / "model.safetensors").unlink()
    (models / "a" / "pytorch_model.bin").write_bytes(b"not really a pickle")
    err = error_of(capsys, models, fill(models))
    assert "pickle" in err and "execute arbitrary code" in err and "safetensors" in err


def test_missing_model_folder(models, capsys):
    err = error_of(capsys, models, fill(models).replace(str(models / "b"), "./no/such/model"))
    assert "./no/such/model" in err and "no such folder" in err


def test_single_shard_layout_per_version(models):
    assert run_merge(models, fill(models)) == 0
    assert sorted(p.name for p in (models / "out").glob("model*")) == ["model.safetensors"]
    assert run_merge(models, fill(models), "--mergekit-version", "0.0.5.1") == 0
    names = sorted(p.name for p in (models / "out").glob("model-*"))
    assert names == ["model-00001-of-00001.safetensors"]
    index = json.loads((models / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"mergekit_version": "0.0.5.1", "total_size": index["metadata"]["total_size"]}
    config = json.loads((models / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["_name_or_path"] == str(models / "base")
