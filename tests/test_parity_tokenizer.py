"""Parity of tokenizer merging and chat templates with mergekit 0.1.5: each recipe of
tests/parity/tokenizer/ (made by tests/parity/make_tokenizer_goldens.py) merged by remerge
gives mergekit's output folder: tensors, config.json (vocab_size), tokenizer.json,
tokenizer_config.json, chat_template.jinja and mergekit_config.yml byte for byte, the card up
to the order of its bullets; a refused recipe is refused in one line.

A union over vocabularies whose new tokens are plain tokens of another model (`BY_TOKEN`) gets,
in mergekit, ids in a Rust HashMap's order, random per process (remerge.merge.tokenizer): there
every token's row must be mergekit's row of the same token, and tokenizer.json the same up to
the ids of those tokens.
"""

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import pytest

from remerge.cli import main

HERE = Path(__file__).resolve().parent / "parity" / "tokenizer"
GOLDENS = HERE / "goldens" / "0.1.5"
RECIPES = sorted(p.stem for p in (HERE / "recipes").glob("*.yml"))
BY_TOKEN = {"tok_union_ties_other", "tok_block_union_average"}
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
# recipe -> a line of remerge's stderr (a warning, where mergekit says ERROR and goes on)
WARNS = {"chat_unknown_name": "writes no tokenizer files"}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """{recipe: (exit code, stderr, out)}, merged from tests/parity/tokenizer as mergekit ran."""
    root = tmp_path_factory.mktemp("tokenizer")
    results = {}
    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        for recipe in RECIPES:
            out = root / recipe
            err = io.StringIO()
            handler = logging.StreamHandler(err)
            logging.getLogger("remerge").addHandler(handler)
            with contextlib.redirect_stderr(err):
                code = main(["merge", f"recipes/{recipe}.yml", str(out), "--mergekit-version", "0.1.5"])
            logging.getLogger("remerge").removeHandler(handler)
            results[recipe] = (code, err.getvalue(), out)
    finally:
        os.chdir(cwd)
    return results


def test_every_recipe_has_a_golden():
    assert len(RECIPES) >= 10
    assert sorted(p.name for p in GOLDENS.iterdir()) == RECIPES


def token_ids(tokenizer_json: dict) -> dict[str, int]:
    ids = dict(tokenizer_json["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in tokenizer_json["added_tokens"]})
    return ids


def without_ids(tokenizer_json: dict) -> dict:
    """tokenizer.json with its added tokens as a set (their ids apart)."""
    added = sorted(json.dumps({k: v for k, v in t.items() if k != "id"}, sort_keys=True)
                   for t in tokenizer_json["added_tokens"])
    return {**tokenizer_json, "added_tokens": added}


def assert_same_by_token(out: Path, golden: Path) -> None:
    import torch
    from safetensors.torch import load_file

    mine_tok = json.loads((out / "tokenizer.json").read_text())
    gold_tok = json.loads((golden / "tokenizer.json").read_text())
    assert without_ids(mine_tok) == without_ids(gold_tok)
    mine_ids, gold_ids = token_ids(mine_tok), token_ids(gold_tok)
    assert sorted(mine_ids) == sorted(gold_ids)
    mine, gold = load_file(str(out / "model.safetensors")), load_file(str(golden / "model.safetensors"))
    assert list(mine) == list(gold)
    def bits(t):
        return t.contiguous().view(-1).view(torch.int16 if t.element_size() == 2 else torch.int32)

    for name in gold:
        assert mine[name].shape == gold[name].shape and mine[name].dtype == gold[name].dtype, name
        if name in EMBEDDINGS:
            for token, i in gold_ids.items():
                assert torch.equal(bits(mine[name][mine_ids[token]]), bits(gold[name][i])), (name, token)
        else:
            assert torch.equal(bits(mine[name]), bits(gold[name])), name


@pytest.mark.parametrize("recipe", RECIPES)
def test_parity(merged, recipe):
    code, err, out = merged[recipe]
    golden = GOLDENS / recipe
    if (golden / "REFUSED.txt").exists():
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1, err
        return
    assert code == 0, err
    if recipe in WARNS:
        assert WARNS[recipe] in err, err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in golden.iterdir())
    for f in sorted(golden.iterdir()):
        mine, gold = (out / f.name).read_bytes(), f.read_bytes()
        if f.name == "README.md":  # the "Models Merged" bullets come from a set in mergekit
            assert sorted(mine.splitlines()) == sorted(gold.splitlines())
        elif recipe in BY_TOKEN and f.name in ("model.safetensors", "tokenizer.json"):
            continue
        else:
            assert mine == gold, f"{f.name} differs"
    if recipe in BY_TOKEN:
        assert_same_by_token(out, golden)


def test_shard_jobs_give_the_same_bytes(tmp_path, monkeypatch):
    """The workflow's route: plan.json (the vocabulary layout in it), each shard in its own
    call, then configs: the bytes of `remerge merge`, hence mergekit's."""
    monkeypatch.chdir(HERE)
    recipe = "recipes/tok_block_pad_ta.yml"
    plan = tmp_path / "plan.json"
    assert main(["plan", recipe, str(plan), "--out-shard-size", "2K"]) == 0
    shards = json.loads(plan.read_text())["shards"]
    assert len(shards) > 1
    out = tmp_path / "model"
    out.mkdir()
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name in reversed(names):
        assert main(["merge-shard", str(plan), recipe, str(out / name)]) == 0
    assert main(["configs", recipe, str(out)]) == 0
    import torch
    from safetensors.torch import load_file

    gold = load_file(str(GOLDENS / "tok_block_pad_ta" / "model.safetensors"))
    mine = {}
    for name in names:
        mine.update(load_file(str(out / name)))
    assert sorted(mine) == sorted(gold)
    for name in gold:
        assert torch.equal(mine[name].view(torch.int16), gold[name].view(torch.int16)), name
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (GOLDENS / "tok_block_pad_ta" / f).read_bytes(), f
