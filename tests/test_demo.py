"""The embedded demo: real checkpoints, deterministic bytes, and two separable skills."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from remerge.demo import models as demo
from remerge.cli import main

SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    demo.build_demo_models(out, seed=0)
    return out


def digests(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", demo.MODEL_NAMES)
def test_folder_is_a_sharded_llama_checkpoint(demo_dir: Path, name: str) -> None:
    folder = demo_dir / name
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3 and all(SHARD.fullmatch(s) for s in shards)
    index = read_json(folder / "model.safetensors.index.json")
    assert sorted(set(index["weight_map"].values())) == shards
    assert "lm_head.weight" in index["weight_map"]  # untied, as in Llama-3.1-8B
    config = read_json(folder / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    assert config["vocab_size"] == len(demo.VOCAB)
    assert read_json(folder / "tokenizer.json")["model"]["type"] == "WordLevel"
    assert not (folder / "chat_template.jinja").exists()  # the template lives in the .json
    assert "--seed 0" in (folder / "README.md").read_text(encoding="utf-8")
    assert not list(demo_dir.glob(".demo-*"))  # the temporary folder is gone


def test_instruct_has_its_own_chat_template_and_generation_config(demo_dir: Path) -> None:
    base_tok = read_json(demo_dir / "base" / "tokenizer_config.json")
    instruct_tok = read_json(demo_dir / "instruct" / "tokenizer_config.json")
    assert "chat_template" not in base_tok
    assert instruct_tok["chat_template"] == demo.CHAT_TEMPLATE
    assert instruct_tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    base_gen = read_json(demo_dir / "base" / "generation_config.json")
    instruct_gen = read_json(demo_dir / "instruct" / "generation_config.json")
    assert base_gen["eos_token_id"] != instruct_gen["eos_token_id"]
    assert instruct_gen["do_sample"] is True and "temperature" not in base_gen
    assert base_gen["max_new_tokens"] != instruct_gen["max_new_tokens"]


def test_same_seed_gives_the_same_bytes(demo_dir: Path, tmp_path: Path) -> None:
    demo.build_demo_models(tmp_path, seed=0)
    for name in demo.MODEL_NAMES:
        assert digests(tmp_path / name) == digests(demo_dir / name)


def test_models_load_and_generate(demo_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(demo_dir / "base")
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "base")
    ids = tok("3 4 5", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == "6 7 8"

    tok = AutoTokenizer.from_pretrained(demo_dir / "instruct")
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "instruct")
    chat = [{"role": "user", "content": "count down from 9"}]
    enc = tok.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = enc["input_ids"]
    out = model.generate(ids, do_sample=False)  # stops at </s> or "user"
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).startswith("8 7 6")


def test_count_down_prompts_are_the_chat_templates_tokens(demo_dir: Path) -> None:
    """Plain-text task prompts tokenize exactly like the instruct model's rendered chat."""
    tok = AutoTokenizer.from_pretrained(demo_dir / "instruct")
    for q in demo.task_questions("count_down", 20, seed=0):
        start = re.search(r"from (\d+)", q["context"]).group(1)
        chat = [{"role": "user", "content": f"count down from {start}"}]
        rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        chat_ids = tok(rendered, add_special_tokens=False).input_ids  # the template wrote <s>
        prompt_ids = tok(q["context"]).input_ids  # <s> added, as in lm-eval's call
        assert prompt_ids[: len(chat_ids)] == chat_ids


def test_shipped_task_data_is_what_the_generator_writes(tmp_path: Path) -> None:
    for path in demo.write_task_data(tmp_path):
        shipped = demo.TASK_DIR / path.name
        assert shipped.read_bytes() == path.read_bytes(), f"regenerate {shipped}"
        rows = [json.loads(line) for line in shipped.read_text().splitlines()]
        assert len(rows) == demo.TASK_QUESTIONS == len({r["context"] for r in rows})


def test_cli_refuses_a_negative_seed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", str(tmp_path / "out"), "--seed", "-1"]) == 2
    assert "--seed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_lm_eval_separates_the_skills(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real lm-eval run of both tasks, from an unrelated directory (data paths resolve)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(demo.TASK_DIR))
    acc = {}
    for name in demo.MODEL_NAMES:
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={demo_dir / name},dtype=bfloat16",
            tasks=[f"demo_{skill}" for skill in demo.SKILLS],
            task_manager=manager,
            batch_size=64,
            device="cpu",
            bootstrap_iters=0,
        )
        acc[name] = {s: res["results"][f"demo_{s}"]["acc,none"] for s in demo.SKILLS}
    # Measured for seed 0 (seeds 1-4 alike): base 1.00 / 0.04, instruct 0.00 / 1.00.
    assert acc["base"]["count_up"] >= 0.9 and acc["instruct"]["count_down"] >= 0.9
    assert acc["base"]["count_up"] - acc["instruct"]["count_up"] >= 0.5
    assert acc["instruct"]["count_down"] - acc["base"]["count_down"] >= 0.5
