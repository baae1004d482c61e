"""Parity on tiny real transformers checkpoints of every architecture remerge knows: each
recipe of tests/parity/arch/ (ties, slerp, linear, a passthrough frankenmerge per
architecture) merged by remerge equals mergekit 0.1.5's output (tests/parity/arch/goldens/,
made by tests/parity/make_arch_goldens.py) byte for byte: tensors, shard cut, index,
config.json, tokenizer files, mergekit_config.yml; the card up to the order of its bullets.
"""

import contextlib
import io
import logging
import os
from pathlib import Path

import pytest

from remerge.cli import main

ARCH = Path(__file__).resolve().parent / "parity" / "arch"
GOLDENS = ARCH / "goldens" / "0.1.5"
RECIPES = sorted(p.stem for p in (ARCH / "recipes").glob("*.yml"))
OPTIONS = {"passthrough": ["--out-shard-size", "20K"]}  # as make_arch_goldens.py ran them
SHARDED = ("mixtral", "mixtral_mixed")  # every method into several shards there

METHODS = ("ties", "slerp", "linear", "passthrough")
# Where remerge and mergekit 0.1.5 part: recipe -> (why, remerge's exit code, a line of its stderr).
DIVERGENCES = {
    **{f"gpt_neox_{m}": (
        "a transformers 5 checkpoint stores no attention.bias / masked_bias / rotary_emb.inv_freq, "
        "which mergekit's definition requires (it fails); remerge leaves out required tensors that "
        "no input stores, with a warning (gpt_neox_buffers_* store them: identical)", 0,
        "which mergekit's GPTNeoXForCausalLM definition requires") for m in METHODS},
}


def options(recipe: str) -> list[str]:
    arch, method = recipe.rsplit("_", 1)
    return OPTIONS.get(method) or (["--out-shard-size", "20K"] if arch in SHARDED else [])


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """{recipe: (exit code, stderr, out)}, merged from tests/parity/arch as mergekit ran."""
    root = tmp_path_factory.mktemp("arch")
    results = {}
    cwd = os.getcwd()
    os.chdir(ARCH)
    try:
        for recipe in RECIPES:
            out = root / recipe
            err = io.StringIO()
            handler = logging.StreamHandler(err)  # warnings too, however logging is set up
            logging.getLogger("remerge").addHandler(handler)
            with contextlib.redirect_stderr(err):
                code = main(["merge", f"recipes/{recipe}.yml", str(out), "--mergekit-version", "0.1.5",
                             *options(recipe)])
            logging.getLogger("remerge").removeHandler(handler)
            results[recipe] = (code, err.getvalue(), out)
    finally:
        os.chdir(cwd)
    return results


def test_every_recipe_has_a_golden():
    assert len(RECIPES) >= 40
    assert sorted(p.name for p in GOLDENS.iterdir()) == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_parity(merged, recipe):
    code, err, out = merged[recipe]
    golden = GOLDENS / recipe
    if recipe in DIVERGENCES:
        _, want, line = DIVERGENCES[recipe]
        assert code == want and line in err, err
        if want == 2:
            assert len(err.strip().splitlines()) == 1, err  # one line
        return
    if (golden / "REFUSED.txt").exists():
        assert code == 2, err
        return
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in golden.iterdir())
    for f in sorted(golden.iterdir()):
        mine, gold = (out / f.name).read_bytes(), f.read_bytes()
        if f.name == "README.md":  # the "Models Merged" bullets come from a set in mergekit
            assert sorted(mine.splitlines()) == sorted(gold.splitlines())
        else:
            assert mine == gold, f"{f.name} differs"
