"""The command line: every command's help, the merge's stages run by hand (plan, merge-shard,
assemble, configs, card) against `remerge merge`, the workflow's card and grid, bad inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from remerge.cli import COMMANDS, main
from tinymodels import TIES_RECIPE as RECIPE, finetune, random_tensors, write_model

SHARD_SIZE = "4K"  # the tiny models are ~14 KB in bfloat16: several output shards


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    base = random_tensors(0)
    write_model(tmp_path / "base", base, shards=3)
    # a tokenizer, so that configs copies more than config.json
    (tmp_path / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (tmp_path / "base" / "tokenizer.json").write_text('{"version": "1.0", "model": {}}\n')
    write_model(tmp_path / "a", finetune(base, 1))
    write_model(tmp_path / "b", finetune(base, 2), shards=2)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(RECIPE.format(a=tmp_path / "a", b=tmp_path / "b", base=tmp_path / "base"))
    return tmp_path


def cli(capsys, *argv) -> tuple[int, str, str]:
    """`remerge ARGV` in this process: (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def by_hand(capsys, models: Path, out: Path, *, digests: bool = False) -> list[str]:
    """plan -> merge-shard (each shard) -> assemble -> configs -> card; returns the shard names."""
    recipe, plan = models / "recipe.yml", models / "work" / "plan.json"
    rc, stdout, err = cli(capsys, "plan", recipe, plan, "--out-shard-size", SHARD_SIZE)
    assert rc == 0, err
    shards = stdout.split()
    for name in reversed(shards):  # any order
        extra = ["--digests", models / "work" / "digests" / f"{name}.json"] if digests else []
        rc, _, err = cli(capsys, "merge-shard", plan, recipe, out / name, *extra)
        assert rc == 0, err
    extra = []
    if digests:
        extra = ["--digests", *sorted((models / "work" / "digests").iterdir()),
                 "--tensors", models / "work" / "tensors.json"]
    rc, _, err = cli(capsys, "assemble", plan, recipe, out, *extra)
    assert rc == 0, err
    extra = ["--record", models / "work" / "configs.json"] if digests else []
    rc, _, err = cli(capsys, "configs", recipe, out, *extra)
    assert rc == 0, err
    if not digests:
        rc, _, err = cli(capsys, "card", recipe, out / "README.md")
        assert rc == 0, err
    return shards


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    rc, out, _ = cli(capsys, command, "--help")
    assert rc == 0
    assert out.startswith(f"usage: remerge {command} ")
    assert COMMANDS[command][1] in out  # the one-line help, as `remerge --help` lists it


def test_the_stages_by_hand_write_the_merge_byte_for_byte(models, capsys):
    rc, _, err = cli(capsys, "merge", models / "recipe.yml", models / "merged" / "out",
                     "--out-shard-size", SHARD_SIZE)
    assert rc == 0, err
    shards = by_hand(capsys, models, models / "hand" / "out")
    assert len(shards) >= 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    merged, hand = files_of(models / "merged" / "out"), files_of(models / "hand" / "out")
    assert sorted(hand) == sorted(merged)
    assert {"README.md", "config.json", "mergekit_config.yml", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", *shards} == set(merged)
    for name in merged:
        assert hand[name] == merged[name], name
    assert "# out\n" in hand["README.md"].decode()  # titled by its folder


def test_the_workflows_records_and_card_by_hand(models, capsys):
    out, work = models / "hand" / "out", models / "work"
    shards = by_hand(capsys, models, out, digests=True)
    tensors = json.loads((work / "tensors.json").read_text())
    assert tensors["shards"] == shards
    for shard in shards:  # every tensor's sha256 is of its bytes in the shard
        with safe_open(str(out / shard), "pt") as f:
            for name in f.keys():
                data = f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                assert tensors["tensors"][name] == hashlib.sha256(data).hexdigest()
    configs = json.loads((work / "configs.json").read_text())
    assert configs["transplant_from"] is None
    assert set(configs["files"]) == {"config.json", "tokenizer.json", "tokenizer_config.json"}

    manifests = []
    for model in ("base", "a", "b"):
        rc, _, err = cli(capsys, "manifest", models / model, "--out", work / f"{model}.manifest.json")
        assert rc == 0, err
        manifests += ["--manifest", f"{models / model}={work / f'{model}.manifest.json'}"]
    rc, _, err = cli(capsys, "card", models / "recipe.yml", out, "--name", "tiny_ties",
                     "--provenance", work / "provenance.json", *manifests,
                     "--tensors", work / "tensors.json", "--configs", work / "configs.json",
                     "--model-name", f"{models / 'a'}=a", "--license", "apache-2.0",
                     "--point", "density=0.5")
    assert rc == 0, err
    record = json.loads((work / "provenance.json").read_text())
    assert record["name"] == "tiny_ties" and record["grid_point"] == {"density": "0.5"}
    assert record["output"]["tensors_digest"] == tensors["digest"]
    assert record["configs"] == configs and record["scores"] is None
    assert [(i["reference"], i["name"]) for i in record["inputs"]] == [
        (str(models / "a"), "a"), (str(models / "b"), None), (str(models / "base"), None)]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "license: apache-2.0" in card and tensors["digest"] in card


def test_grid_collects_the_points_and_references(tmp_path, capsys):
    merge = tmp_path / "ties_grid"
    for density in ("0.5", "0.25"):
        for weight in ("1.0", "0.5"):
            point = merge / f"density~{density}" / f"weight~{weight}"
            point.mkdir(parents=True)
            acc = float(density) * float(weight)
            (point / "scores.json").write_text(json.dumps({"tasks": {"arc_easy": {"acc": acc}}}))
            (point / "tensors.json").write_text(json.dumps({"digest": f"d{density}-{weight}"}))
    (merge / "density~0.5" / "weight~1.0" / "model").mkdir()  # a point's other folders are no points
    reference = tmp_path / "base.scores.json"
    reference.write_text(json.dumps({"tasks": {"arc_easy": {"acc": 0.125}}}))
    rc, out, err = cli(capsys, "grid", merge, "--reference", f"base={reference}")
    assert rc == 0, err
    assert "4 point(s), 1 reference(s)" in out
    rows = [line.split("\t") for line in (merge / "grid.tsv").read_text().splitlines()]
    assert rows[0] == ["kind", "point", "density", "weight", "arc_easy acc", "tensors_digest"]
    assert rows[1:] == [  # in grid order: numeric, the last key fastest
        ["merge", "density~0.25/weight~0.5", "0.25", "0.5", "12.50", "d0.25-0.5"],
        ["merge", "density~0.25/weight~1.0", "0.25", "1.0", "25.00", "d0.25-1.0"],
        ["merge", "density~0.5/weight~0.5", "0.5", "0.5", "25.00", "d0.5-0.5"],
        ["merge", "density~0.5/weight~1.0", "0.5", "1.0", "50.00", "d0.5-1.0"],
        ["reference", "base", "NA", "NA", "12.50", ""],
    ]
    assert (merge / "grid.png").read_bytes().startswith(b"\x89PNG")


# --- bad inputs: one line naming the item, exit status 2 -------------------------------------


def one_line_error(capsys, command: str, *args) -> str:
    rc, _, err = cli(capsys, command, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"remerge {command}: error: ")
    return lines[0]


def test_plan_names_a_missing_model_folder(models, capsys):
    recipe = models / "recipe.yml"
    recipe.write_text(recipe.read_text().replace(str(models / "b"), str(models / "nowhere")))
    err = one_line_error(capsys, "plan", recipe, models / "plan.json")
    assert str(models / "nowhere") in err and "no such folder" in err
    assert not (models / "plan.json").exists()


def test_merge_shard_names_a_shard_the_plan_lacks(models, capsys):
    recipe, plan = models / "recipe.yml", models / "plan.json"
    assert cli(capsys, "plan", recipe, plan, "--out-shard-size", SHARD_SIZE)[0] == 0
    err = one_line_error(capsys, "merge-shard", plan, recipe, models / "out" / "model.safetensors")
    assert "model.safetensors" in err and "has no shard of that name" in err
    assert "model-00001-of-" in err  # and says which it has
    assert not (models / "out" / "model.safetensors").exists()
    err = one_line_error(capsys, "merge-shard", models / "missing.json", recipe,
                         models / "out" / "model.safetensors")
    assert str(models / "missing.json") in err


def test_assemble_names_a_missing_plan_and_missing_shards(models, capsys):
    recipe, plan = models / "recipe.yml", models / "plan.json"
    err = one_line_error(capsys, "assemble", plan, recipe, models / "out")
    assert f"cannot read the shard plan {plan}" in err
    assert cli(capsys, "plan", recipe, plan, "--out-shard-size", SHARD_SIZE)[0] == 0
    err = one_line_error(capsys, "assemble", plan, recipe, models / "out")
    assert "lacks shard(s) model-00001-of-" in err and "remerge merge-shard" in err


def test_configs_names_a_transplant_donor_without_config(models, capsys):
    (models / "donor").mkdir()
    err = one_line_error(capsys, "configs", models / "recipe.yml", models / "out",
                         "--transplant-from", models / "donor")
    assert f"transplant donor {models / 'donor'} has no config.json" in err


def test_card_names_a_model_without_manifest(models, capsys):
    err = one_line_error(capsys, "card", models / "recipe.yml", models / "README.md",
                         "--provenance", models / "provenance.json")
    assert str(models / "a") in err and "--manifest" in err
    err = one_line_error(capsys, "card", models / "missing.yml", models / "README.md")
    assert str(models / "missing.yml") in err


def test_grid_names_a_point_without_its_tensors_record(tmp_path, capsys):
    err = one_line_error(capsys, "grid", tmp_path / "ties")
    assert str(tmp_path / "ties") in err
    point = tmp_path / "ties" / "single"
    point.mkdir(parents=True)
    (point / "scores.json").write_text("{}")
    err = one_line_error(capsys, "grid", tmp_path / "ties")
    assert f"{point / 'tensors.json'}: no such tensors record" in err
