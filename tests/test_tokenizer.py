"""Tokenizer settings and chat templates (remerge.merge.tokenizer): parsing as mergekit 0.1.5
validates them, the embedding re-rowing rules on hand-made tensors, the plan's record, and the
built-in templates' bytes. End-to-end parity with mergekit: tests/test_parity_tokenizer.py."""

from pathlib import Path

import pytest
import torch

from remerge.errors import RecipeError
from remerge.merge import tokenizer as tk
from remerge.merge.plan import Plan
from remerge.merge.recipe import parse_recipe

GOLDENS = Path(__file__).resolve().parent / "parity" / "tokenizer" / "goldens" / "0.1.5"
HEAD = "models: [{model: a}]\nmerge_method: ties\nbase_model: b\n"


def test_tokenizer_source_forms():
    assert parse_recipe(HEAD + "tokenizer_source: union\n").tokenizer == tk.TokenizerSpec("union")
    assert parse_recipe(HEAD + "tokenizer_source: base\n").tokenizer.source == "base"
    assert parse_recipe(HEAD + "tokenizer_source: org/model\n").tokenizer.source == "org/model"
    assert parse_recipe(HEAD).tokenizer is None


def test_tokenizer_block():
    spec = parse_recipe(HEAD + """\
tokenizer:
  pad_to_multiple_of: 64
  tokens:
    <|im_start|>: {source: a}
    <z>: {source: {kind: zero}, force: true}
    <m>: {source: {kind: model_token, model: b, token_id: 7}}
    <n>: {source: {kind: model_token, model: a, token: hi}}
""").tokenizer
    assert spec.source == "union" and spec.pad_to_multiple_of == 64  # union: the default
    assert dict(spec.tokens) == {
        "<|im_start|>": tk.TokenSource("model", "a"),
        "<z>": tk.TokenSource("zero", force=True),
        "<m>": tk.TokenSource("model_token", "b", token_id=7),
        "<n>": tk.TokenSource("model_token", "a", token="hi"),
    }
    assert spec.models == ("a", "b")


@pytest.mark.parametrize("extra, message", [
    ("tokenizer_source: base\ntokenizer: {source: union}\n", "together"),
    ("tokenizer: {pad_to_multiple_of: 0}\n", "positive whole number"),
    ("tokenizer: {sorce: base}\n", "a mapping of `source`"),
    ("tokenizer: {tokens: {x: {source: {kind: model_token, model: a, token: y, token_id: 1}}}}\n",
     "one of `token` and `token_id`"),
    ("tokenizer: {tokens: {x: {source: {kind: mean}}}}\n", "a model, {kind: zero}"),
    ("tokenizer: {tokens: {x: {force: maybe}}}\n", "true or false"),
    ("chat_template: [a]\n", "as a string"),
    # with a tokenizer setting mergekit fails after the merge: refused before it
    ("tokenizer_source: union\nchat_template: vicuna\n", "Invalid chat template"),
])
def test_refusals(extra, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(HEAD + extra)


def test_refused_under_a_release_remerge_does_not_follow_there():
    with pytest.raises(RecipeError, match="mergekit 0.1.5 does only"):
        parse_recipe(HEAD + "tokenizer_source: union\n", version="0.0.5.1")
    with pytest.raises(RecipeError, match="chat_template"):
        parse_recipe(HEAD + "chat_template: chatml\n", version="0.1.4")


def test_references_are_renamed():
    r = parse_recipe(HEAD + "tokenizer:\n  source: a\n  tokens: {x: {source: b}}\n")
    renamed = r.with_references({"a": "/m/a", "b": "/m/b"})
    assert renamed.tokenizer.source == "/m/a" and dict(renamed.tokenizer.tokens)["x"].model == "/m/b"


def test_builtin_templates_are_mergekits_bytes():
    """The data files equal what mergekit 0.1.5 wrote for `chat_template: llama3` / `chatml`."""
    written = lambda recipe: (GOLDENS / recipe / "chat_template.jinja").read_text()  # noqa: E731
    assert tk.builtin_or_literal("llama3") == written("chat_builtin_llama3")
    assert tk.builtin_or_literal("chatml") == written("tok_union_linear")
    names = sorted(p.stem for p in tk.TEMPLATES.glob("*.jinja"))
    assert names == ["alpaca", "chatml", "exaone", "llama3", "mistral"]


@pytest.mark.parametrize("value, ok", [
    ("{% for m in messages %}{{ m }}{% endfor %}", True),  # a template
    ("a long text without a brace at all", False),  # 20+ characters, no "{"
    ("{{ x }}", False),  # a template under 20 characters
    ("vicuna", False),  # no such built-in
    ("../../../etc/passwd", False),
])
def test_literal_templates(value, ok):
    if ok:
        assert tk.builtin_or_literal(value) == value
    else:
        with pytest.raises(RecipeError, match="Invalid chat template"):
            tk.builtin_or_literal(value)


def test_rows_as_runs_round_trip():
    rows = [0, 1, 2, -1, 7, 8, 3, -1, -1, 4]
    runs = tk._runs(rows)
    assert runs == [[0, 0, 3], [4, 7, 2], [6, 3, 1], [9, 4, 1]]
    assert tk.rows_of({"tokens": len(rows), "rows": {"m": runs}}, "m") == rows
    assert tk.padded(50, 8) == 56 and tk.padded(56, 8) == 56 and tk.padded(50, None) == 50


def layout(rows, size=None, configs=(), base="base"):
    n = len(next(iter(rows.values())))
    return {"size": size or n, "tokens": n, "base": base,
            "rows": {m: tk._runs(r) for m, r in rows.items()}, "configs": list(configs)}


def test_re_rowing_rules():
    """Token 0: in every model (own rows). 1: the base lacks it, a and b have it (their mean,
    summed in bf16). 2: only b (b's row for all). 3: a and the base (the base's row). 4: none
    (zeros). Pad rows: the mean of the real ones."""
    bf = torch.bfloat16
    base = torch.tensor([[1.0], [3.0], [5.0]], dtype=bf)  # tokens 0, 3, 5th row unused
    a = torch.tensor([[10.0], [1.5], [2.25]], dtype=bf)  # tokens 0, 1, 3
    b = torch.tensor([[20.0], [0.3], [7.0]], dtype=bf)  # tokens 0, 1, 2
    lay = layout({"base": [0, -1, -1, 1, -1], "a": [0, 1, -1, 2, -1], "b": [0, 1, 2, -1, -1]}, size=8)
    out = tk.permute_embeddings({"base": base, "a": a, "b": b}, lay)
    mean1 = ((torch.zeros(1, dtype=bf) + a[1]) + b[1]) / 2
    assert out["base"][:5, 0].tolist() == [1.0, mean1.item(), 7.0, 3.0, 0.0]
    assert out["a"][:5, 0].tolist() == [10.0, 1.5, 7.0, 2.25, 0.0]
    assert out["b"][:5, 0].tolist() == [20.0, 0.30078125, 7.0, 3.0, 0.0]
    for m in out:
        assert out[m].shape == (8, 1) and out[m].dtype == bf
        assert torch.equal(out[m][5:], torch.mean(out[m][:5], dim=0).expand(3, 1))


def test_token_settings_and_force():
    """A forced setting replaces every model's row; a model_token row reads that model's tensor
    as stored; a zero source; an unforced setting of a token every model has changes nothing."""
    f32 = torch.float32
    base = torch.tensor([[1.0], [2.0], [3.0]], dtype=f32)
    a = torch.tensor([[4.0], [5.0], [6.0]], dtype=f32)
    lay = layout({"base": [0, 1, -1, 2], "a": [0, 1, 2, -1]}, configs=[
        [0, True, "model_token", "a", 2],  # forced: a's row 2 for both
        [1, False, "zero", None, None],  # every model has it: unchanged
        [2, False, "zero", None, None],  # the base lacks it: zeros there
        [3, True, "model", "base", None],  # forced, the base's own row for token 3
    ])
    out = tk.permute_embeddings({"base": base, "a": a}, lay)
    assert out["base"][:, 0].tolist() == [6.0, 2.0, 0.0, 3.0]
    assert out["a"][:, 0].tolist() == [6.0, 5.0, 6.0, 3.0]


def test_promoted_dtype():
    out = tk.permute_embeddings({"base": torch.ones(2, 1, dtype=torch.bfloat16),
                                 "a": torch.ones(2, 1, dtype=torch.float16)},
                                layout({"base": [0, 1], "a": [0, 1]}))
    assert {t.dtype for t in out.values()} == {torch.float32}


def test_plan_records_the_layout(monkeypatch):
    """The plan (JSON, read by every shard job) holds the embeddings' layout and shapes."""
    here = GOLDENS.parents[1]
    monkeypatch.chdir(here)
    from remerge.merge.plan import plan_merge
    from remerge.merge.recipe import load_recipe

    recipe = load_recipe("recipes/tok_block_pad_ta.yml")
    plan = plan_merge(recipe, {ref: ref for ref in recipe.inputs})
    again = Plan.from_json(plan.to_json())
    embed = again.tensors["model.embed_tokens.weight"]
    assert embed.shape == (56, 8) and embed.vocab["tokens"] == 54 and embed.vocab["size"] == 56
    assert again.tensors["lm_head.weight"].vocab == embed.vocab
    assert again.tensors["model.norm.weight"].vocab is None
    # the base and ft_b share the vocabulary: one run each; ft_added adds 3 rows
    assert embed.vocab["rows"]["./models/base"] == [[0, 0, 50]]
    assert embed.vocab["rows"]["./models/ft_added"] == [[0, 0, 53]]
    assert embed.vocab["configs"][2] == [5, True, "model_token", "./models/ft_b", 7]
