"""remerge.evaluation (settings, preflight, run) and `remerge evaluate`: a real lm-eval run of
a tiny random Llama.

Runs that load a model go through the command line in a subprocess whose environment turns
the hub off from the first import (huggingface_hub and datasets read HF_HUB_OFFLINE when they
are imported, so setting it inside this process could come too late). One evaluation is shared
by the asserts on its output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from remerge.errors import EvaluationError
from remerge.evaluation import preflight, run, scores
from remerge.evaluation.settings import PRESETS, EvalSettings, discover_tasks, needs_gpu
from remerge.hub.manifest import local_manifest, write_manifest

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
QUESTIONS = 10


# ------------------------------------------------------------------------- fixtures


def build_tiny_llama(folder: Path) -> Path:
    """A randomly initialised 2-layer Llama with a character-level fast tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({chr(c): 3 + i for i, c in enumerate(range(32, 127))})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tokenizer.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_task(folder: Path, task: str, data_file: str | Path, dataset_path: str = "json") -> None:
    """A multiple-choice lm-eval task over a JSONL file (`dataset_path: json`)."""
    lines = [
        f"task: {task}",
        f"dataset_path: {dataset_path}",
        "dataset_name: null",
        *(
            [f"dataset_kwargs:\n  data_files:\n    test: {data_file}"]
            if dataset_path == "json"
            else []
        ),
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "Q: {{question}}"',
        'doc_to_choice: "{{choices}}"',
        "doc_to_target: label",
        "metric_list:",
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true",
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true",
        "metadata:\n  version: 1.0",
    ]
    (folder / f"{task}.yaml").write_text("\n".join(lines) + "\n")


def write_questions(path: Path, offset: int) -> Path:
    rows = []
    for i in range(QUESTIONS):
        a, b = (i + offset) % 10, (3 * i + offset) % 10
        rows.append(
            {
                "question": f"{a}+{b}=",
                "choices": [str(a + b), str(a + b + 1), str(a * b)],
                "label": 0,
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def tiny_model(work: Path) -> Path:
    return build_tiny_llama(work / "tiny-llama")


@pytest.fixture(scope="module")
def task_dir(work: Path) -> Path:
    """Two local tasks and a group over them; data files given by absolute path."""
    folder = work / "tasks"
    folder.mkdir()
    for i, task in enumerate(("tiny_add_a", "tiny_add_b")):
        write_task(folder, task, write_questions(work / f"{task}.jsonl", offset=i))
    (folder / "tiny_suite.yaml").write_text(
        "group: tiny_suite\ntask:\n  - tiny_add_a\n  - tiny_add_b\n"
        "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder


@pytest.fixture(scope="module")
def env(work: Path) -> dict[str, str]:
    """Hub off, caches inside the test's folder."""
    return {**os.environ, **OFFLINE, "HF_HOME": str(work / "hf-home")}


def remerge(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "remerge.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def evaluated(tiny_model: Path, task_dir: Path, env: dict[str, str], work: Path):
    """One real evaluation, shared by the tests that read its output."""
    out = work / "point" / "eval" / "results.json"
    args = [
        "evaluate",
        str(tiny_model),
        "--out",
        str(out),
        "--tasks",
        "tiny_suite",
        "--include-path",
        str(task_dir),
        "--batch-size",
        "4",
        "--log-samples",
    ]
    proc = remerge(args, env, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_results_json_holds_the_tasks_metrics(evaluated: Path, tiny_model: Path):
    results = json.loads(evaluated.read_text())
    for task in ("tiny_add_a", "tiny_add_b"):
        assert 0.0 <= results["results"][task]["acc,none"] <= 1.0
        assert 0.0 <= results["results"][task]["acc_norm,none"] <= 1.0
        assert results["n-samples"][task] == {"original": QUESTIONS, "effective": QUESTIONS}
        assert results["n-shot"][task] == 0
        assert results["higher_is_better"][task] == {"acc": True, "acc_norm": True}
        assert results["configs"][task]["dataset_path"] == "json"
    assert "acc,none" in results["groups"]["tiny_suite"]
    assert results["group_subtasks"] == {"tiny_suite": ["tiny_add_a", "tiny_add_b"]}
    assert "samples" not in results  # those go to their own files
    assert results["config"]["bootstrap_iters"] == 0
    assert results["config"]["model_args"]["pretrained"] == str(tiny_model.resolve())
    assert results["config"]["model_dtype"] == "torch.float32"  # JSON-safe: a string
    assert results["remerge"]["settings"]["tasks"] == ["tiny_suite"]
    assert results["remerge"]["apply_chat_template"] is False


@pytest.mark.slow
def test_per_sample_logs_are_written_next_to_the_results(evaluated: Path):
    for task in ("tiny_add_a", "tiny_add_b"):
        rows = [
            json.loads(line) for line in (evaluated.parent / "samples" / f"{task}.jsonl").open()
        ]
        assert len(rows) == QUESTIONS
        assert {"doc_id", "doc", "acc", "acc_norm"} <= set(rows[0])
    leftovers = [p.name for p in evaluated.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary files


@pytest.mark.slow
def test_task_scores_of_a_real_run(evaluated: Path):
    results = json.loads(evaluated.read_text())
    task_scores = scores.task_scores(results)
    assert set(task_scores) == {"tiny_add_a", "tiny_add_b", "tiny_suite"}
    assert set(task_scores["tiny_add_a"]) == {"acc", "acc_norm"}
    assert scores.scores_document(results)["card"] is None  # no leaderboard task ran


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["corrupt config.json", "no weights"])
def test_a_model_folder_that_does_not_load_fails_naming_it(
    damage: str, tiny_model: Path, task_dir: Path, env: dict[str, str], work: Path
):
    broken = work / f"broken-{damage.replace(' ', '-')}"
    shutil.copytree(tiny_model, broken)
    if damage == "no weights":
        (broken / "model.safetensors").unlink()
    else:
        (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    out = work / "broken-results.json"
    proc = remerge(
        [
            "evaluate",
            str(broken),
            "--out",
            str(out),
            "--tasks",
            "tiny_add_a",
            "--include-path",
            str(task_dir),
        ],
        env,
        cwd=work,
    )
    assert proc.returncode == 2
    assert f"model folder {broken}" in proc.stderr and "does not load" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_missing_datasets_offline_are_named_with_what_to_fetch(
    tiny_model: Path, env: dict[str, str], work: Path
):
    folder = work / "tasks-missing-data"
    folder.mkdir()
    write_task(folder, "needs_hub_data", "", dataset_path="remerge-tests/not-in-cache")
    write_task(folder, "needs_local_file", "no-such-file.jsonl")  # relative: against cwd
    proc = remerge(
        [
            "evaluate",
            str(tiny_model),
            "--check",
            "--tasks",
            "needs_hub_data,needs_local_file",
            "--include-path",
            str(folder),
        ],
        env,
        cwd=work,
    )
    assert proc.returncode == 2
    assert "dataset 'remerge-tests/not-in-cache'" in proc.stderr
    assert "datasets.load_dataset('remerge-tests/not-in-cache')" in proc.stderr
    assert "needs_local_file" in proc.stderr and "no-such-file.jsonl" in proc.stderr
    assert str(work) in proc.stderr  # says what relative paths are resolved against


# ------------------------------------------------------------------------- preflight in-process
# Only the task index is read here (no model, no dataset download, no hub).


@pytest.mark.slow
def test_an_unknown_task_fails_naming_it_before_the_model_loads(
    tiny_model: Path, task_dir: Path, tmp_path: Path
):
    settings = EvalSettings.create(tasks="tiny_add_c", include_path=[task_dir])
    out = tmp_path / "results.json"
    with pytest.raises(
        EvaluationError, match=r"unknown task 'tiny_add_c'.*did you mean .*tiny_add_a"
    ):
        run.evaluate_model(tiny_model, settings, out)
    assert not out.exists()


@pytest.mark.slow
def test_preflight_catches_missing_punkt_tab_with_its_fetch_command(
    task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import nltk

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)  # hub "on": no dataset lookups in this test
    empty = tmp_path / "nltk_data"
    empty.mkdir()
    monkeypatch.setenv("NLTK_DATA", str(empty))
    monkeypatch.setattr(nltk.data, "path", [str(empty)])  # nltk read NLTK_DATA at import
    settings = EvalSettings.create(tasks="leaderboard_ifeval", include_path=[task_dir])
    problems = [p for p in preflight.find_problems(settings) if "punkt_tab" in p]
    assert len(problems) == 1
    assert f"python -m nltk.downloader -d {empty} punkt_tab" in problems[0]
    with pytest.raises(EvaluationError, match="punkt_tab"):
        preflight.preflight(settings)

    (empty / "tokenizers" / "punkt_tab" / "english").mkdir(parents=True)
    assert not [p for p in preflight.find_problems(settings) if "punkt_tab" in p]


# ------------------------------------------------------------------------- settings, presets


def test_leaderboard_preset_has_the_six_tasks_and_flags():
    settings = EvalSettings.create(preset="leaderboard")
    assert settings.tasks == (
        "leaderboard_ifeval",
        "leaderboard_bbh",
        "leaderboard_math_hard",
        "leaderboard_gpqa",
        "leaderboard_musr",
        "leaderboard_mmlu_pro",
    )
    assert settings.batch_size == "auto"
    assert settings.apply_chat_template == "auto" and settings.fewshot_as_multiturn
    assert settings.trust_remote_code is False and settings.num_fewshot is None


def test_explicit_settings_override_the_preset():
    settings = EvalSettings.create(
        preset="leaderboard", tasks="leaderboard_ifeval", batch_size=2, limit=5
    )
    assert settings.tasks == ("leaderboard_ifeval",)
    assert (settings.batch_size, settings.limit, settings.apply_chat_template) == (2, 5, "auto")


def test_demo_preset_lists_the_task_yamls_of_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    write_task(tmp_path, "skill_b", "/data/b.jsonl")
    write_task(tmp_path, "skill_a", "/data/a.jsonl")
    (tmp_path / "suite.yaml").write_text("group: suite\ntask: [skill_a, skill_b]\n")
    (tmp_path / "_template_yaml.yaml").write_text("doc_to_text: !function utils.doc_to_text\n")
    demo = dataclasses.replace(PRESETS["demo"], include_path=(str(tmp_path),))
    monkeypatch.setitem(PRESETS, "demo", demo)
    settings = EvalSettings.create(preset="demo")
    assert settings.tasks == ("skill_a", "skill_b")
    assert settings.include_path == (str(tmp_path),)


def test_a_folder_without_task_yamls_is_an_error(tmp_path: Path):
    with pytest.raises(EvaluationError, match=f"no lm-eval task YAML in {tmp_path}"):
        discover_tasks(tmp_path)


def test_settings_from_a_config_mapping():
    settings = EvalSettings.from_mapping({"preset": "leaderboard", "limit": 10, "device": "cuda:0"})
    assert settings.limit == 10 and needs_gpu(settings)
    with pytest.raises(EvaluationError, match=r"unknown evaluation setting\(s\) \['batchsize'\]"):
        EvalSettings.from_mapping({"tasks": ["x"], "batchsize": 4})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dtype", "fp8", "dtype 'fp8'"),
        ("batch_size", 0, "batch_size 0"),
        ("batch_size", "big", "batch_size 'big'"),
        ("limit", -1, "limit -1"),
        ("apply_chat_template", "yes", "apply_chat_template 'yes'"),
    ],
)
def test_bad_settings_are_named(field: str, value: Any, message: str):
    with pytest.raises(EvaluationError, match=message):
        EvalSettings.create(tasks="x", **{field: value})


def test_needs_gpu_follows_the_device():
    assert not needs_gpu(EvalSettings.create(tasks="x"))
    assert needs_gpu(EvalSettings.create(tasks="x", device="cuda"))
    assert not needs_gpu(EvalSettings.create(tasks="x", device="mps"))


def test_chat_template_auto_follows_the_model_folder(tmp_path: Path):
    auto = EvalSettings.create(tasks="x", apply_chat_template="auto")
    forced = EvalSettings.create(tasks="x", apply_chat_template=True)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert preflight.resolve_chat_template(tmp_path, auto) is False
    with pytest.raises(EvaluationError, match=f"{tmp_path} has no chat template"):
        preflight.resolve_chat_template(tmp_path, forced)
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert preflight.resolve_chat_template(tmp_path, auto) is True


def test_a_folder_without_config_json_is_named(tmp_path: Path):
    with pytest.raises(EvaluationError, match=f"model folder {tmp_path} has no config.json"):
        preflight.check_model_dir(tmp_path)


# ------------------------------------------------------------------------- the workflow job


def test_evaluate_and_score_reads_the_manifest_clears_stale_files_and_writes_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    manifest = tmp_path / "manifest.json"
    write_manifest(local_manifest(folder), manifest)
    results_path, scores_path = tmp_path / "eval" / "results.json", tmp_path / "scores.json"
    results_path.parent.mkdir()
    stale = [results_path.with_name(".results.json.tmp-1"), tmp_path / ".scores.json.tmp-2"]
    for path in stale:
        path.write_text("half-written")
    stale.append(results_path.with_name(".samples.tmp-3"))  # a half-written samples folder
    stale[-1].mkdir()
    calls = []

    def fake_evaluate_model(*args: Any) -> dict[str, Any]:
        calls.append(args)
        return {"results": {"tiny_add_a": {"acc,none": 0.5, "acc_stderr,none": "N/A"}}}

    monkeypatch.setattr(run, "evaluate_model", fake_evaluate_model)
    run.evaluate_and_score(
        model_dir=None,
        manifest=str(manifest),
        settings={"tasks": ["tiny_add_a"], "limit": 2},
        samples_dir=None,
        results_path=str(results_path),
        scores_path=str(scores_path),
    )
    settings = EvalSettings.create(tasks=["tiny_add_a"], limit=2)
    assert calls == [(folder.as_posix(), settings, str(results_path), None)]
    assert not any(path.exists() for path in stale)
    document = json.loads(scores_path.read_text())
    assert document["tasks"] == {"tiny_add_a": {"acc": 0.5}} and document["card"] is None
