#!/usr/bin/env python3.11
"""Regenerate the tokenizer and chat-template parity goldens under tests/parity/tokenizer/
(mergekit 0.1.5 only).

    python3.11 tests/parity/make_tokenizer_goldens.py                 # models, recipes, goldens
    python3.11 tests/parity/make_tokenizer_goldens.py --only tok_base_ties --skip-models

Models (Llama-shaped as make_goldens.py's: hidden 8, 3 layers, bf16, lm_head untied), whose
vocabularies really differ. Every token's embedding and lm_head row is a seeded function of the
token's text plus a per-model delta, so a row permuted to the wrong token shows:

    base       the parity tokenizer: <unk> <s> </s> <pad> w04..w49 (50, WordLevel), no chat template
    ft_b       base's vocabulary; chat template T1 in tokenizer_config.json
    ft_c       base's vocabulary; chat template T1 (plus a newline) in chat_template.jinja
    ft_added   base's vocabulary + 3 added tokens: <|im_start|>, <|im_end|> (special) and x00
               (ids 50-52, vocab_size 53); chat template T2
    ft_other   another vocabulary of 50: the specials, w04..w29 at other ids (shuffled), and
               x00..x19; w30..w49 absent

Each recipe runs as make_goldens.py runs them (same environment, no ASLR, cwd
tests/parity/tokenizer), keeping mergekit's output folder or REFUSED.txt:

    tokenizer/models/<model>/   tokenizer/recipes/<recipe>.yml   tokenizer/goldens/0.1.5/<recipe>/

Not run by CI. Needs the 0.1.5 side venv of make_goldens.py (created if missing).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import make_goldens as mg

HERE = Path(__file__).resolve().parent / "tokenizer"
VERSION = "0.1.5"

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB_A = SPECIALS + [f"w{i:02d}" for i in range(4, 50)]
ADDED = [("<|im_start|>", True), ("<|im_end|>", True), ("x00", False)]  # (content, special)
T1 = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
T2 = "{% for message in messages %}{{ '<|im_start|>' + message['content'] + '<|im_end|>' }}{% endfor %}"


def vocab_other() -> list[str]:
    import random

    shared = [f"w{i:02d}" for i in range(4, 30)]
    new = [f"x{i:02d}" for i in range(20)]
    rest = shared + new
    random.Random("remerge-parity/tokenizer/other").shuffle(rest)
    return SPECIALS + rest


# model -> (vocabulary, added tokens, chat template, where the template is, marker)
MODELS = {
    "base": (VOCAB_A, [], None, None, 0),
    "ft_b": (VOCAB_A, [], T1, "config", 2),
    "ft_c": (VOCAB_A, [], T1 + "\n", "jinja", 3),
    "ft_added": (VOCAB_A, ADDED, T2, "config", 4),
    "ft_other": ("other", [], None, None, 5),
}

RECIPES = {
    # union of the base's vocabulary and added tokens only: the output's ids are deterministic
    "tok_union_linear": """\
models:
  - model: ./models/base
    parameters: {weight: 0.6}
  - model: ./models/ft_added
    parameters: {weight: 0.4}
merge_method: linear
base_model: ./models/base
tokenizer_source: union
chat_template: chatml
dtype: bfloat16
""",
    # a union over really different vocabularies: mergekit adds ft_other's new tokens in the
    # order of a Rust HashMap (random per process), so ids differ run to run (compared by token)
    "tok_union_ties_other": """\
models:
  - model: ./models/ft_other
    parameters: {density: 0.5, weight: 0.5}
  - model: ./models/ft_added
    parameters: {density: 0.7, weight: 0.3}
merge_method: ties
base_model: ./models/base
tokenizer_source: union
dtype: bfloat16
""",
    "tok_base_ties": """\
models:
  - model: ./models/ft_other
    parameters: {density: 0.5, weight: 0.5}
  - model: ./models/ft_added
    parameters: {density: 0.7, weight: 0.3}
merge_method: ties
base_model: ./models/base
tokenizer_source: base
dtype: bfloat16
""",
    "tok_model_slerp": """\
models:
  - model: ./models/base
  - model: ./models/ft_other
merge_method: slerp
base_model: ./models/base
tokenizer_source: ./models/ft_other
parameters: {t: 0.3}
dtype: bfloat16
""",
    "tok_block_pad_ta": """\
models:
  - model: ./models/ft_added
    parameters: {weight: 0.7}
  - model: ./models/ft_b
    parameters: {weight: 0.5}
merge_method: task_arithmetic
base_model: ./models/base
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    <|im_start|>:
      source: ./models/ft_added
    <new>:
      source: {kind: zero}
    w05:
      source: {kind: model_token, model: ./models/ft_b, token: w07}
      force: true
    w06:
      source: {kind: model_token, model: ./models/ft_added, token_id: 51}
      force: true
dtype: bfloat16
""",
    # mergekit 0.1.5 fails when `source: base` gets a new token: it adds it to the base's own
    # tokenizer object, then finds the base's id for it beyond the base's vocab_size (KeyError)
    "error_tokenizer_base_new_token": """\
models:
  - model: ./models/ft_b
    parameters: {weight: 0.5}
merge_method: task_arithmetic
base_model: ./models/base
tokenizer:
  source: base
  tokens:
    <new>:
      source: {kind: zero}
dtype: bfloat16
""",
    # the block's default source (union), a token averaged: x00 is in ft_other and ft_added
    # only (ft_other's other new tokens make the ids random, as in tok_union_ties_other);
    # float32 compute on bf16 inputs
    "tok_block_union_average": """\
models:
  - model: ./models/base
    parameters: {weight: 0.2}
  - model: ./models/ft_other
    parameters: {weight: 0.5}
  - model: ./models/ft_added
    parameters: {weight: 0.5}
merge_method: linear
base_model: ./models/base
tokenizer:
  pad_to_multiple_of: 4
dtype: float32
out_dtype: bfloat16
""",
    "chat_auto_ties": """\
models:
  - model: ./models/ft_b
    parameters: {density: 0.5, weight: 0.5}
  - model: ./models/ft_c
    parameters: {density: 0.5, weight: 0.5}
merge_method: ties
base_model: ./models/base
chat_template: auto
dtype: bfloat16
""",
    "chat_builtin_llama3": """\
models:
  - model: ./models/ft_b
    parameters: {weight: 0.5}
merge_method: task_arithmetic
base_model: ./models/base
chat_template: llama3
dtype: bfloat16
""",
    "chat_literal": """\
models:
  - model: ./models/base
    parameters: {weight: 0.5}
  - model: ./models/ft_b
    parameters: {weight: 0.5}
merge_method: linear
base_model: ./models/base
chat_template: "{% for message in messages %}{{ message['content'] }}{% endfor %}"
dtype: bfloat16
""",
    # mergekit merges, then fails to copy the tokenizer and writes none (an ERROR line only)
    "chat_unknown_name": """\
models:
  - model: ./models/ft_b
    parameters: {weight: 0.5}
merge_method: task_arithmetic
base_model: ./models/base
chat_template: vicuna
dtype: bfloat16
""",
    "error_tokenizer_both": """\
models:
  - model: ./models/ft_b
    parameters: {weight: 0.5}
merge_method: task_arithmetic
base_model: ./models/base
tokenizer_source: base
tokenizer:
  source: union
dtype: bfloat16
""",
}


# --- the models (run inside the side venv) ----------------------------------------------------


def seeded(key: str, shape, scale: float):
    import zlib

    import torch

    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(shape, generator=g) * scale


def row(model: str, name: str, token: str):
    """One token's row: shared by every model (the token's text decides it) plus a delta."""
    base = seeded(f"tok/{name}/{token}", (mg.HIDDEN,), 0.3).bfloat16().float()
    if model == "base":
        return base.bfloat16()
    return (base + seeded(f"tok/{model}/{name}/{token}", (mg.HIDDEN,), 0.05)).bfloat16()


def tensors_of(model: str, vocab: list[str]) -> dict:
    import torch

    out = {}
    for name, shape in mg.tensor_shapes(tied=False):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = torch.stack([row(model, name, tok) for tok in vocab]).contiguous()
            continue
        value = seeded(f"tok/base/{name}", shape, 0.2) + (1.0 if len(shape) == 1 else 0.0)
        if model != "base":
            value = value + seeded(f"tok/{model}/{name}", shape, 0.03)
        out[name] = value.bfloat16().contiguous()
    return out


def write_tokenizer(folder: Path, vocab: list[str], added, template, where, marker: int) -> None:
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    for content, special in added:  # ids after the vocabulary, in this order
        tok.add_tokens([AddedToken(content, special=special, normalized=not special)])
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    mg.write_json(folder / "special_tokens_map.json", special)
    config = {**special, "clean_up_tokenization_spaces": False, "model_max_length": 64 + marker,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if where == "config":
        config["chat_template"] = template
    elif where == "jinja":
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    mg.write_json(folder / "tokenizer_config.json", config)


def build_models(out: Path) -> None:
    from safetensors.torch import save_file

    if out.exists():
        shutil.rmtree(out)
    for model, (vocab, added, template, where, marker) in MODELS.items():
        vocab = vocab_other() if vocab == "other" else vocab
        folder = out / model
        folder.mkdir(parents=True)
        rows = vocab + [content for content, _ in added]
        save_file(tensors_of(model, rows), str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = mg.model_config("bf16", False, marker)
        config["vocab_size"] = len(rows)
        mg.write_json(folder / "config.json", config)
        mg.write_json(folder / "generation_config.json",
                      {"bos_token_id": 1, "eos_token_id": 2, "max_length": 64 + marker})
        write_tokenizer(folder, vocab, added, template, where, marker)
    print(f"built {len(MODELS)} models in {out}", flush=True)


# --- orchestration (the system python3.11) ----------------------------------------------------


def run_recipe(root: Path, recipe: str, prefix: list, log_dir: Path) -> str:
    return mg.run_recipe(root, VERSION, recipe, log_dir, prefix, here=HERE, options=[], tag="tokenizer")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv-root", type=Path, default=Path.home() / ".cache" / "remerge-parity")
    ap.add_argument("--python", default="python3.11")
    ap.add_argument("--only", action="append", default=[], help="recipe name (repeatable)")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--_build", dest="build", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build:  # inside the venv
        build_models(HERE / "models")
        return 0
    root = args.venv_root.expanduser().resolve()
    py = mg.ensure_venv(root, VERSION, args.python)
    if not args.skip_models:
        subprocess.run([str(py), __file__, "--_build"], check=True)
    (HERE / "recipes").mkdir(parents=True, exist_ok=True)
    for name, text in RECIPES.items():
        (HERE / "recipes" / f"{name}.yml").write_text(text)
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = mg.no_aslr_prefix()
    for name in args.only or RECIPES:
        print(f"[{VERSION}] {name}: {run_recipe(root, name, prefix, log_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
