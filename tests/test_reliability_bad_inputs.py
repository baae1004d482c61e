"""Reliability: bad inputs. Bad config files fail before any job with one clear line; damaged input
models fail in their job with a message naming the file, leave nothing a later run would trust,
and are recorded anew once repaired. Shared fixtures: tests/reliability.py.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import faults
from conftest import SNAKEMAKE, offline_env, snakemake
from reliability import CONFIG, FIGURES, hidden_files, jobs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reliability_module")]


# Config files that must fail before any job runs with one clear line, writing nothing.
# (tests/test_config.py has unknown grid and top-level keys, value ranges, the method, missing
# models and folders, `../x` as a merge name, the demo source and two sources.)
RAW_CONFIGS = {
    "yaml_syntax": ("models:\n  base: {path: ../inputs/base\nmerges: [\n", "Config file is not valid JSON or YAML"),
    "yaml_tabs": ("models:\n\tbase:\n\t\tpath: ../inputs/base\n", "Config file is not valid JSON or YAML"),
    "empty_file": ("", "Config file must be given as JSON or YAML with keys at top level"),
    "top_level_list": ("- models\n- merges\n", "Config file must be given as JSON or YAML with keys at top level"),
}


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


CONFIG_CASES = {
    "merge_name_absolute": (lambda c: _rename(c["merges"], "m", "/tmp/evil"),
                            "merges: '/tmp/evil' is not allowed: letters, digits, _ . - (no slashes, no leading dot)"),
    "merge_name_slash": (lambda c: _rename(c["merges"], "m", "a/../../b"), "merges: 'a/../../b' is not allowed"),
    "merge_name_dotdot": (lambda c: _rename(c["merges"], "m", ".."), "merges: '..' is not allowed"),
    "merge_name_hidden": (lambda c: _rename(c["merges"], "m", ".m"), "merges: '.m' is not allowed"),
    "merge_name_reserved": (lambda c: _rename(c["merges"], "m", "models"),
                            "merges.models: not a usable merge name"),
    "model_name_pathlike": (lambda c: _rename(c["models"], "a", "../a"), "models: '../a' is not allowed"),
    "audit_name_pathlike": (lambda c: c.update(audits={"../audit": {"published": "../inputs/a"}}),
                            "audits: '../audit' is not allowed"),
    "unknown_model_key": (lambda c: c["models"]["a"].update(revison="main"),
                          "unknown key `revison` in models.a (allowed: demo, license, path, repo, revision)"),
    "unknown_merge_key": (lambda c: c["merges"]["m"].update(transplant_form="a"),
                          "unknown key `transplant_form` in merges.m"),
    "unknown_evaluation_key": (lambda c: c["evaluation"].update(batchsize=8),
                               "unknown key `batchsize` in evaluation"),
    "unknown_demo_key": (lambda c: c.update(demo={"sed": 1}), "unknown key `sed` in demo (allowed: seed)"),
    "missing_merges": (lambda c: c.pop("merges"), "(top level): 'merges' is a required property"),
    "missing_recipe": (lambda c: c["merges"]["m"].pop("recipe"), "merges.m: 'recipe' is a required property"),
    "recipe_not_a_recipe": (lambda c: c["merges"]["m"].update(recipe=42),
                            "merges.m.recipe: 42 is not of type 'object', 'string'"),
    "shard_size_unit": (lambda c: c["merges"]["m"].update(out_shard_size="5GB"),
                        "merges.m.out_shard_size: '5GB' is not allowed: bytes, or a number with K / M / B"),
    "mergekit_version": (lambda c: c["merges"]["m"].update(mergekit_version="0.2"),
                         "merges.m.mergekit_version: '0.2' is not allowed"),
    "grid_empty": (lambda c: c["merges"]["m"]["grid"].update(density=[]), "merges.m.grid.density: [] should be non-empty"),
    "grid_key_for_other_method": (lambda c: c["merges"]["m"]["grid"].update(gamma=[0.1]),
                                  "unknown key `gamma` in merges.m.grid: ties has no numeric parameter of "
                                  "that name (allowed: density, lambda, weight)"),
    "recipe_dtype": (lambda c: c["merges"]["m"]["recipe"].update(dtype="float8"),
                     "merges.m.recipe: dtype `float8` is not supported (allowed: bfloat16, float16, float32)"),
    "weight_not_a_number": (lambda c: c["merges"]["m"]["recipe"]["models"][0]["parameters"].update(weight="heavy"),
                            "merges.m.recipe: models[0].parameters.weight: 'heavy' is not a number"),
    "eval_dtype": (lambda c: c["evaluation"].update(dtype="fp8"), "evaluation.dtype: 'fp8' is not allowed"),
    "model_path_is_a_file": (lambda c: c["models"]["a"].update(path="../inputs/a/config.json"),
                             "models.a.path: ../inputs/a/config.json is a file, not a folder"),
}


def _dry_run(space: Path, name: str, text: str) -> tuple[str, subprocess.CompletedProcess, Path]:
    """A dry run in a folder next to inputs/ (the configs name ../inputs/...)."""
    work = space / f"bad-config-{name}"
    config = space / f"bad-config-{name}.yaml"
    config.write_text(text)
    return name, snakemake(work, "-n", config=config), work


def test_bad_configs_fail_with_one_line_before_any_job(space):
    base = yaml.safe_load(CONFIG.read_text())
    texts = dict((k, v[0]) for k, v in RAW_CONFIGS.items())
    for name, (change, _) in CONFIG_CASES.items():
        config = copy.deepcopy(base)
        change(config)
        texts[name] = yaml.safe_dump(config)
    expected = {**{k: v[1] for k, v in RAW_CONFIGS.items()}, **{k: v[1] for k, v in CONFIG_CASES.items()}}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda item: _dry_run(space, *item), texts.items()))
    problems = []
    for name, proc, work in results:
        FIGURES["bad_inputs_tried"] += 1
        FIGURES["bad_inputs"].append({"kind": "config", "case": name, "message": expected[name]})
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or not any(expected[name] in line for line in out.splitlines()):
            problems.append(f"{name}: rc {proc.returncode}\n{out[-1500:]}")
        if (work / "results").exists() or (work / "logs").exists():
            problems.append(f"{name}: wrote results/ or logs/")
    assert not problems, "\n\n".join(problems)


def test_recipe_text_with_a_yaml_error_names_the_merge(space):
    config = yaml.safe_load(CONFIG.read_text())
    config["merges"]["m"]["recipe"] = "models: [\n  - model: a\n"
    FIGURES["bad_inputs_tried"] += 1
    FIGURES["bad_inputs"].append({"kind": "config", "case": "recipe_text_yaml_error", "message": "(raw ParserError)"})
    _, proc, work = _dry_run(space, "recipe_text_yaml_error", yaml.safe_dump(config))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (work / "results").exists()
    assert any("config error: merges.m.recipe" in line for line in out.splitlines()), out[-1500:]


# Damaged input models, each the only merged model of a merge of its own (all derived from
# inputs/b: two shards and an index). stage: the job that must fail; expect: what its log says.
def _header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


SHARD1, SHARD2, INDEX = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"


def _shard_of(folder: Path, tensor: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][tensor]


def _replace_tensor(folder: Path, name: str, value: torch.Tensor | None) -> Path:
    shard = _shard_of(folder, name)
    tensors = load_file(shard)
    if value is None:
        del tensors[name]
        index = json.loads((folder / INDEX).read_text())
        del index["weight_map"][name]
        (folder / INDEX).write_text(json.dumps(index))
    else:
        tensors[name] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def _overlap(folder: Path) -> Path:
    """Two same-sized tensors of shard 1 pointing at the same bytes: the header passes remerge's
    checks (sizes, bounds) but safetensors refuses the file when a shard job opens it."""
    shard = folder / SHARD1
    header, body = _header(shard.read_bytes())
    groups: dict = {}
    for name, entry in sorted(header.items()):
        if name != "__metadata__":
            groups.setdefault((entry["dtype"], tuple(entry["shape"])), []).append(name)
    first, second = next(names for names in groups.values() if len(names) > 1)[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    shard.write_bytes(_with_header(header, body))
    return shard


def _duplicate(folder: Path) -> Path:
    """model.norm.weight stored in both shards (a botched re-sharding)."""
    source = _shard_of(folder, "model.norm.weight")
    other = folder / (SHARD2 if source.name == SHARD1 else SHARD1)
    tensors = load_file(other)
    tensors["model.norm.weight"] = load_file(source)["model.norm.weight"]
    save_file(tensors, other, metadata={"format": "pt"})
    return folder  # the message names the model's folder and both file names


def _garbage_json(path: Path) -> Path:
    header, body = _header(path.read_bytes())
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    path.write_bytes(struct.pack("<Q", n) + b"{not json at all" + b"!" * (n - 16) + body)
    return path


def _remove(folder: Path, *names: str) -> Path:
    for name in names:
        (folder / name).unlink()
    return folder


MODEL_CASES = {
    # case: (damage(folder) -> the path the message must name, stage, message parts)
    "truncated_data": (lambda f: (f / SHARD2).write_bytes((f / SHARD2).read_bytes()[:-100]) and f / SHARD2,
                       "plan_merge", ["the file is truncated or damaged", "tensor "]),
    "truncated_header": (lambda f: (f / SHARD1).write_bytes((f / SHARD1).read_bytes()[:5]) and f / SHARD1,
                         "plan_merge", ["truncated safetensors file (5 bytes, no header)"]),
    "empty_shard": (lambda f: (f / SHARD1).write_bytes(b"") or f / SHARD1,
                    "plan_merge", ["truncated safetensors file (0 bytes, no header)"]),
    "header_length_garbage": (lambda f: (f / SHARD1).write_bytes(b"\xff" * 8 + (f / SHARD1).read_bytes()[8:]) and f / SHARD1,
                              "plan_merge", ["not a safetensors file or truncated"]),
    "garbage_header": (lambda f: _garbage_json(f / SHARD1), "plan_merge", ["safetensors header is not valid JSON"]),
    "unsupported_dtype": (lambda f: _replace_tensor(f, "model.norm.weight", torch.zeros(16, dtype=torch.float8_e5m2)),
                          "plan_merge", ["tensor model.norm.weight has unsupported dtype F8_E5M2"]),
    "mismatched_shape": (lambda f: _replace_tensor(f, "model.norm.weight", torch.zeros(7, dtype=torch.bfloat16)),
                         "plan_merge", ["tensor model.norm.weight: shape [7] in model ../inputs/bad/mismatched_shape",
                                        "merging needs identical shapes"]),
    "missing_tensor": (lambda f: _replace_tensor(f, "model.layers.2.mlp.down_proj.weight", None) and f,
                       "plan_merge", ["tensor model.layers.2.mlp.down_proj.weight is missing from model "
                                      "../inputs/bad/missing_tensor"]),
    "index_missing_shard": (lambda f: _remove(f, SHARD2) and f / INDEX, "plan_merge",
                            [f"names shard {SHARD2}, which is missing from ../inputs/bad/index_missing_shard"]),
    "broken_index": (lambda f: (f / INDEX).write_text("{\"weight_map\": {") and f / INDEX,
                     "plan_merge", ["unreadable index"]),
    "pickle_only": (lambda f: _remove(f, SHARD1, SHARD2, INDEX).joinpath("pytorch_model.bin").write_bytes(b"\x80\x04not really")
                    and f, "plan_merge", ["has only pickle weights (pytorch_model.bin)", "execute arbitrary code"]),
    "no_weights": (lambda f: _remove(f, SHARD1, SHARD2, INDEX), "plan_merge",
                   ["no *.safetensors weights in ../inputs/bad/no_weights"]),
    "empty_folder": (lambda f: _remove(f, SHARD1, SHARD2, INDEX, "config.json"), "record_model",
                     ["the folder holds no files"]),
    "duplicate_tensor": (_duplicate, "plan_merge", [f"tensor model.norm.weight is in both {SHARD1} and {SHARD2}"]),
    # the header passes the size checks but its data_offsets overlap
    "overlapping_offsets": (_overlap, "plan_merge", ["overlapping the previous tensor"]),
}
REPAIRED = ["truncated_data", "overlapping_offsets"]  # fixed in place, then rerun


def _model_config(cases) -> dict:
    config = {"models": {"base": {"path": "../inputs/base"}}, "merges": {}, "evaluation": {"references": False}}
    for case in cases:
        config["models"][f"bad_{case}"] = {"path": f"../inputs/bad/{case}"}
        config["merges"][case] = {
            "recipe": {"models": [{"model": f"bad_{case}", "parameters": {"weight": 0.6, "density": 0.7}}],
                       "merge_method": "ties", "base_model": "base",
                       "parameters": {"normalize": True, "int8_mask": True}, "dtype": "bfloat16"},
            "evaluate": False,
        }
    return config


@pytest.fixture(scope="module")
def bad_models(space) -> dict:
    """One run (--keep-going) over a merge per damaged model; its log and what it left."""
    bad = space / "inputs" / "bad"
    named = {}
    for case, (damage, stage, parts) in MODEL_CASES.items():
        shutil.copytree(space / "inputs" / "b", bad / case)
        named[case] = str(damage(bad / case)).replace(str(space / "inputs"), "../inputs")
        FIGURES["bad_inputs_tried"] += 1
        FIGURES["bad_inputs"].append({"kind": "model", "case": case, "failing_job": stage, "message": parts})
    config = space / "bad-models.yaml"
    config.write_text(yaml.safe_dump(_model_config(MODEL_CASES)))
    work = space / "bad-models"
    proc = snakemake(work, "--cores", "2", "--keep-going", config=config)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    failed = [(j["rule"], j.get("wildcards", "")) for j in jobs(out) if j.get("failed")]
    return {"work": work, "config": config, "named": named, "out": out, "failed": failed, "bad": bad}


def _failed_logs(run: dict, case: str, stage: str) -> tuple[list[tuple[str, str]], str]:
    """The case's failed jobs of `stage` and the text of their logs."""
    key = f"model=bad_{case}" if stage == "record_model" else f"merge={case}"
    failed = [(r, w) for r, w in run["failed"] if r == stage and (key + ",") in (w + ",")]
    logs = run["work"] / "logs"
    paths = {"record_model": [logs / "models" / f"bad_{case}" / "record_model.log"],
             "plan_merge": [logs / case / "plan_merge.log"]}.get(stage)
    if paths is None:
        paths = [logs / case / "single" / "merge_shard" / f"{w.rsplit('shard=', 1)[1]}.log" for _, w in failed]
    return failed, "\n".join(p.read_text() for p in paths if p.is_file())


def test_bad_models_fail_in_their_job_with_a_message_naming_the_file(bad_models):
    problems = []
    for case, (_, stage, parts) in MODEL_CASES.items():
        failed, text = _failed_logs(bad_models, case, stage)
        if not failed:
            problems.append(f"{case}: no failed {stage} job")
        for part in parts + [bad_models["named"][case]]:
            if part not in text:
                problems.append(f"{case}: the {stage} log does not say {part!r}:\n{text[-1500:]}")
    assert not problems, "\n".join(problems)


def test_overlapping_offsets_are_refused_naming_the_file(bad_models):
    results = bad_models["work"] / "results" / "overlapping_offsets"
    failed = [(r, w) for r, w in bad_models["failed"] if "merge=overlapping_offsets" in w]
    texts = [_failed_logs(bad_models, "overlapping_offsets", stage)[1] for stage in ("plan_merge", "merge_shard")]
    assert failed, "the merge of a file with overlapping data_offsets succeeded"
    assert any("offset" in t and bad_models["named"]["overlapping_offsets"] in t for t in texts)
    assert not (results / "single" / "tensors.json").exists()


def test_bad_models_leave_no_file_a_later_run_would_trust(bad_models):
    results = bad_models["work"] / "results"
    problems = []
    for case, (_, stage, _) in MODEL_CASES.items():
        failed, _ = _failed_logs(bad_models, case, stage)
        if (results / "models" / f"bad_{case}" / "manifest.json").exists() and stage == "record_model":
            problems.append(f"{case}: the manifest.json of a failed record_model job")
        left = sorted(p.relative_to(results).as_posix() for p in (results / case).rglob("*") if p.is_file()) \
            if (results / case).exists() else []
        if stage == "merge_shard":  # shards of jobs that failed are gone; nothing after them exists
            for _, w in failed:
                shard = w.rsplit("shard=", 1)[1]
                if [p for p in left if shard in p]:
                    problems.append(f"{case}: an output of the failed merge_shard job for {shard} remains")
            left = [p for p in left if not re.search(r"(model(-\d+-of-\d+)?\.safetensors|digests/.*\.json|plan\.json)$", p)]
        if left:
            problems.append(f"{case}: files left after its {stage} job failed: {left}")
    hidden = hidden_files(results)
    if hidden:
        problems.append(f"temporary or hidden files left: {hidden}")
    assert not problems, "\n".join(problems)


def test_bad_models_repaired_in_place_are_recorded_anew(bad_models):
    """Fix two of them in place (as `cp` over the file, or a re-download, would) and rerun:
    the manifests are re-recorded (not the broken files' ones trusted), and the merges equal
    `remerge merge` of the intact model."""
    work, bad, results = bad_models["work"], bad_models["bad"], bad_models["work"] / "results"
    good = bad.parent / "b"
    for case in REPAIRED:
        for name in (SHARD1, SHARD2):
            target = bad / case / name
            if not target.exists() or target.read_bytes() != (good / name).read_bytes():
                with open(target, "wb") as f:  # the same inode: the folder's mtime does not change
                    f.write((good / name).read_bytes())
    targets = [f"results/{case}/single/provenance.json" for case in REPAIRED]
    snakemake(work, "--cores", "2", *targets, config=bad_models["config"], check=True)
    ref = work.parent / "bad-models-cli"
    recipe = work.parent / "bad-models-cli.yml"
    recipe.write_text((results / REPAIRED[0] / "single" / "model" / "mergekit_config.yml").read_text()
                      .replace(f"../inputs/bad/{REPAIRED[0]}", "../inputs/b"))
    cli = subprocess.run([str(Path(SNAKEMAKE).with_name("remerge")), "merge", str(recipe), str(ref)],
                         cwd=work, capture_output=True, text=True, env=offline_env())
    assert cli.returncode == 0, cli.stderr
    from remerge.hub.manifest import hash_file

    for case in REPAIRED:
        manifest = json.loads((results / "models" / f"bad_{case}" / "manifest.json").read_text())
        for entry in manifest["files"]:
            actual = bad / case / entry["path"]
            assert (entry["size"], entry["sha256"]) == (actual.stat().st_size, hash_file(actual)), (case, entry)
        prov = json.loads((results / case / "single" / "provenance.json").read_text())
        [record] = [i for i in prov["inputs"] if i["reference"] == f"../inputs/bad/{case}"]
        assert record["files"] == manifest["files"]
        model = results / case / "single" / "model"
        shards = sorted(p.name for p in model.glob("*.safetensors"))
        assert shards == sorted(p.name for p in ref.glob("*.safetensors")) and shards
        differing = 0
        for name in shards:
            differing += faults.bytes_differing((model / name).read_bytes(), (ref / name).read_bytes())
        FIGURES["bytes_differing"] += differing
        FIGURES["comparisons"].append({"comparison": f"bad input {case} repaired in place + rerun vs remerge merge",
                                       "files": len(shards), "bytes_differing": differing})
        assert differing == 0, case
    assert hidden_files(results) == []
