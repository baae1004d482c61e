"""A two-stage merge in the workflow (tests/configs/multistage.yaml): `final` reads `blend`'s
output. Each stage is a merge of its own; the final provenance and card record the chain;
changing only the later stage rebuilds only it."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SNAKEMAKE, jobs_of, snakemake
from remerge.workflow.config import ConfigError, check_config

CONFIG = ROOT / "tests" / "configs" / "multistage.yaml"
slow = pytest.mark.slow  # the tests that run the workflow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("wf-multistage")
    snakemake(work, "--cores", "2", config=CONFIG, check=True)
    return work


def changed_config(tmp_path: Path, change) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    change(config["merges"])
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@slow
def test_the_final_stage_reads_the_first_stages_output(run):
    res = run / "results"
    recipe = yaml.safe_load((res / "final/single/model/mergekit_config.yml").read_text())
    assert recipe["models"] == [{"model": "results/blend/single/model"}]
    for merge in ("blend", "final"):
        assert (res / merge / "plan.json").is_file() and (res / merge / "single/provenance.json").is_file()


@slow
def test_provenance_and_card_record_the_chain(run):
    res = run / "results"
    prov = json.loads((res / "final/single/provenance.json").read_text())
    blend = json.loads((res / "blend/single/provenance.json").read_text())
    assert blend["chain"] == []
    [stage] = prov["chain"]
    assert stage["name"] == "blend" and stage["merge_method"] == "ties"
    assert stage["inputs"] == ["results/demo/instruct", "results/demo/base"]
    assert stage["tensors_digest"] == blend["output"]["tensors_digest"]
    assert stage["provenance_sha256"] == sha256(res / "blend/single/provenance.json")
    [read] = [rec for rec in prov["inputs"] if rec["name"] == "blend"]
    folder = res / "blend/single/model"
    files = {f["path"]: f["sha256"] for f in read["files"]}
    assert "README.md" not in files and "mergekit_config.yml" in files  # the card is written after
    assert files == {p.name: sha256(p) for p in folder.iterdir() if p.name != "README.md"}
    card = (res / "final/single/model/README.md").read_text()
    assert "### Stages" in card and f"|blend|ties|results/demo/instruct, results/demo/base|`{stage['tensors_digest']}`" in card


@slow
def test_the_workflow_equals_the_command_lines_multi_stage_merge(run):
    """The same chain as one mergekit-multi file, merged by `remerge merge`: the same tensors."""
    res = run / "results"
    first = (res / "blend/single/model/mergekit_config.yml").read_text()
    final = (res / "final/single/model/mergekit_config.yml").read_text().replace("results/blend/single/model", "blend")
    (run / "multi.yml").write_text(f"name: blend\n{first}---\n{final}")
    proc = subprocess.run([str(Path(SNAKEMAKE).with_name("remerge")), "merge", "multi.yml", "cli/final",
                           "-I", "cli/stages", "--out-shard-size", "100K"], cwd=run, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for merge, out in (("blend", run / "cli/stages/blend"), ("final", run / "cli/final")):
        shards = sorted((res / merge / "single/model").glob("model-*.safetensors"))
        assert len(shards) == 3
        for shard in shards:
            assert shard.read_bytes() == (out / shard.name).read_bytes(), (merge, shard.name)


@slow
def test_a_second_run_has_nothing_to_do(run):
    proc = snakemake(run, "-n", config=CONFIG, check=True)
    assert "Nothing to be done" in proc.stdout + proc.stderr


@slow
def test_changing_only_the_later_stage_rebuilds_only_it(run, tmp_path):
    config = changed_config(tmp_path, lambda m: m["final"]["recipe"]["parameters"].update(t=0.3))
    jobs = [job for job in jobs_of(snakemake(run, "-n", config=config, check=True).stdout) if job[0] != "all"]
    assert {rule for rule, _ in jobs} == {"plan_merge", "assemble_model", "transplant_configs",
                                          "write_model_card"}  # merge_shard: after the checkpoint
    assert all("merge=final" in wildcards for _, wildcards in jobs), jobs


@slow
def test_changing_the_earlier_stage_rebuilds_both(run, tmp_path):
    config = changed_config(tmp_path, lambda m: m["blend"]["recipe"]["models"][0]["parameters"].update(density=0.7))
    jobs = jobs_of(snakemake(run, "-n", config=config, check=True).stdout)
    assert ("record_stage", "merge=blend, point=single") in jobs
    assert ("plan_merge", "merge=blend") in jobs and ("write_model_card", "merge=final, point=single") in jobs


# --- config checks (no Snakemake) -----------------------------------------------------------


def config_with(change) -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    change(config)
    return config


def blend_reads(name):
    return lambda c: c["merges"]["blend"]["recipe"]["models"][0].update(model=name)


@pytest.mark.parametrize("change, message", [
    (blend_reads("final"), "config error: merges.blend.recipe: the merges read each other in a cycle: "
                           "blend -> final -> blend"),
    (blend_reads("blend"), "the merges read each other in a cycle: blend -> blend"),
    (blend_reads("blnd"), "merges.blend.recipe names model `blnd`, which is not in models: (known: base, "
                          "instruct) nor a merge (known: blend, final)"),
    (lambda c: c["merges"]["blend"].update(grid={"density": [0.5, 1.0]}),
     "merges.final.recipe names `blend`, a merge with a grid: a stage another merge reads is one model"),
    (lambda c: c["models"].update(blend={"demo": "base"}),
     "merges.final.recipe names `blend`, which is both a model and a merge"),
])
def test_bad_chains_in_a_config_are_one_line(change, message):
    with pytest.raises(ConfigError) as err:
        check_config(config_with(change))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_demo_config_has_no_chain():
    demo = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    merges = check_config(demo)
    assert all(not spec.stages(demo["models"]) for spec in merges.values())
