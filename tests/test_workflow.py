"""The workflow end to end on a small configuration, and incremental rebuilds."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SNAKEMAKE, jobs_of, snakemake

pytestmark = pytest.mark.slow
CONFIG = ROOT / "tests" / "configs" / "small.yaml"
POINTS = ["density~0.5/weight~0.5", "density~1.0/weight~0.5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One full run of the small configuration (demo build, merges, evaluation, audits)."""
    work = tmp_path_factory.mktemp("wf")
    snakemake(work, "--cores", "2", config=CONFIG, check=True)
    return work


def test_every_output_is_there(run):
    res = run / "results"
    for merge, points in (("sweep", POINTS), ("seed", ["single"])):
        for point in points:
            model = res / merge / point / "model"
            for name in ("model.safetensors.index.json", "config.json", "README.md", "mergekit_config.yml"):
                assert (model / name).is_file(), model / name
            index = json.loads((model / "model.safetensors.index.json").read_text())
            shards = set(index["weight_map"].values())
            assert len(shards) == 3 and all((model / s).is_file() for s in shards)
            for name in ("scores.json", "provenance.json", "tensors.json", "eval/results.json"):
                assert (res / merge / point / name).is_file()
        assert (res / merge / "grid.tsv").is_file() and (res / merge / "grid.png").stat().st_size > 10_000
    for audit in ("seed_pass", "seed_altered"):
        assert (res / "audits" / audit / "audit.md").is_file()
    assert (run / "logs" / "sweep" / "density~0.5" / "weight~0.5" / "merge_shard").is_dir()
    benchmark = run / "benchmarks" / "seed" / "single" / "merge_shard" / "model-00001-of-00003.tsv"
    assert "max_rss" in benchmark.read_text()


def test_grid_table_has_every_point_and_reference(run):
    lines = (run / "results" / "sweep" / "grid.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    assert header[:4] == ["kind", "point", "density", "weight"] and header[-1] == "tensors_digest"
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    assert [r["point"] for r in rows] == POINTS + ["base", "instruct"]
    digests = {r["point"]: r["tensors_digest"] for r in rows if r["kind"] == "merge"}
    for point, digest in digests.items():
        assert digest == json.loads((run / "results" / "sweep" / point / "tensors.json").read_text())["digest"]
    assert len(set(digests.values())) == 2


def test_merged_models_load_and_generate(run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder in [run / "results" / "sweep" / p / "model" for p in POINTS] + [run / "results/seed/single/model"]:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        ids = tok("3 4 5", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert out.shape[1] > ids.shape[1]
        assert tok.decode(out[0, ids.shape[1]:]).strip()


def test_workflow_shards_equal_the_command_line_merge(run, tmp_path):

    point = run / "results" / "seed" / "single"
    recipe = point / "model" / "mergekit_config.yml"
    code = subprocess.run([str(Path(SNAKEMAKE).with_name("remerge")), "merge", str(recipe), str(tmp_path / "cli"),
                           "--out-shard-size", "100K"], cwd=run, capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    for shard in (point / "model").glob("model-*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "cli" / shard.name).read_bytes()


def test_cards_parse_back_with_their_model_index(run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "results" / "seed" / "single" / "model" / "README.md")
    data = card.data.to_dict()
    assert data["tags"] == ["mergekit", "merge"] and data["library_name"] == "transformers"
    results = data["model-index"][0]["results"]
    assert {r["dataset"]["name"] for r in results} == {"demo_count_up", "demo_count_down"}
    assert "### Config transplant" in card.content and "## Provenance" in card.content
    prov = json.loads((run / "results/seed/single/provenance.json").read_text())
    assert prov["mergekit_semantics"] == "0.0.5.1" and prov["output"]["tensors_digest"] in card.content
    assert len(prov["output"]["tensors"]) == 21  # 2 layers x 9 + embed, norm, lm_head


def test_audits_give_both_verdicts(run):
    ok = json.loads((run / "results/audits/seed_pass/audit.json").read_text())
    bad = json.loads((run / "results/audits/seed_altered/audit.json").read_text())
    assert ok["verdict"] == "bit-identical" and ok["recipe"]["source"] == "README.md"
    assert bad["verdict"] == "different tensors"
    [diff] = bad["tensors"]["differing"]
    assert diff["name"] == "model.layers.0.mlp.down_proj.weight" and diff["differing_elements"] == 1
    [gen] = bad["files"]["differing"]
    assert gen["file"] == "generation_config.json" and gen["keys"][0]["key"] == "temperature"


def test_second_run_has_nothing_to_do(run):
    proc = snakemake(run, "-n", config=CONFIG, check=True)
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.parametrize("merge, key, values, changed_point", [
    ("sweep", "density", [0.3, 1.0], "density~0.3"),  # 0.5 -> 0.3, a per-model parameter (TIES)
    ("slerp", "t", [0.3, 0.6], "t~0.6"),  # 0.7 -> 0.6, a global one (slerp)
])
def test_changing_one_grid_value_reruns_only_its_point(run, tmp_path, merge, key, values, changed_point):
    config = yaml.safe_load(CONFIG.read_text())
    config["merges"][merge]["grid"][key] = values
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))  # sorted keys too: must not matter
    proc = snakemake(run, "-n", config=changed, check=True)
    jobs = jobs_of(proc.stdout)
    assert jobs, proc.stdout[-2000:]
    for rule, wildcards in jobs:
        if rule == "all":
            continue
        if rule == "collect_grid":
            assert f"merge={merge}" in wildcards
            continue
        assert changed_point in wildcards and f"merge={merge}" in wildcards, (rule, wildcards)
    rules = {rule for rule, _ in jobs}
    assert {"merge_shard", "assemble_model", "evaluate_model", "write_model_card"} <= rules
    assert not rules & {"plan_merge", "build_demo_models", "evaluate_reference", "audit_model"}


def test_slerp_sweep_sets_t_globally_and_its_points_differ(run):
    res = run / "results" / "slerp"
    for point in ("t~0.3", "t~0.7"):
        recipe = yaml.safe_load((res / point / "model" / "mergekit_config.yml").read_text())
        assert recipe["merge_method"] == "slerp" and recipe["parameters"]["t"] == float(point[2:])
        assert "parameters" not in recipe["models"][0]
        card = (res / point / "model" / "README.md").read_text()
        assert "[SLERP](https://en.wikipedia.org/wiki/Slerp) merge method." in card
    digests = {json.loads((res / p / "tensors.json").read_text())["digest"] for p in ("t~0.3", "t~0.7")}
    assert len(digests) == 2
    rows = (res / "grid.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:3] == ["kind", "point", "t"] and len(rows) == 1 + 2 + 2  # points, references


def test_lint_and_format(root):
    lint = subprocess.run([SNAKEMAKE, "--lint"], cwd=root, capture_output=True, text=True)
    assert lint.returncode == 0 and "Lints for" not in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    fmt = subprocess.run([str(Path(SNAKEMAKE).with_name("snakefmt")), "--check", "Snakefile", "rules"],
                         cwd=root, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_report_bundles_the_grids(run):
    snakemake(run, "--report", "results/report.html", config=CONFIG, check=True)
    html = (run / "results" / "report.html").read_text(errors="replace")
    assert "grid.png" in html and "grid.tsv" in html


def test_a_model_that_does_not_load_fails_only_its_evaluation(run, tmp_path):
    """One grid point's model is broken after the fact: its evaluation fails with a message
    naming the folder, the other point's evaluation still completes (--keep-going)."""
    work = tmp_path / "copy"
    shutil.copytree(run, work, symlinks=True)
    broken = work / "results" / "sweep" / POINTS[0] / "model"
    (broken / "config.json").write_text("{ not json")
    targets = [f"results/sweep/{p}/scores.json" for p in POINTS]
    proc = snakemake(work, "--cores", "2", "--keep-going", "--forcerun", "evaluate_model", *targets,
                     config=CONFIG)
    assert proc.returncode != 0
    log = (work / "logs" / "sweep" / POINTS[0] / "evaluate_model.log").read_text()
    message = f"model folder {broken.resolve()} does not load"
    assert message in log.splitlines()[-1] and "Traceback" not in log
    assert f"remerge: error: {message}" in proc.stdout + proc.stderr  # on the terminal too
    assert not (work / "results" / "sweep" / POINTS[0] / "scores.json").exists()
    ok = work / "results" / "sweep" / POINTS[1] / "scores.json"
    assert ok.is_file() and ok.stat().st_mtime > (run / "results" / "sweep" / POINTS[1] / "scores.json").stat().st_mtime
