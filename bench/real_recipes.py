#!/usr/bin/env python3
"""Every published recipe of the real-recipe corpus, run by the real mergekit 0.1.5 and by
`remerge merge` on tiny stand-in models, compared file by file.

For each `../shared/real-recipes/recipes/NNN.yaml` (read in place, never copied into the
project; skipped when the folder is absent):

1. Every model reference (`models:`, `base_model:`, `slices: ... sources:`) is mapped to a
   tiny stand-in of the recipe's architecture family (cards/index.tsv's guess: Llama,
   Mistral, Qwen2, Phi-3, Mixtral, GPT-2), built with transformers from seeded random
   weights: all stand-ins of a recipe share a family base and differ by a small per-model
   change (as fine-tunes do), have as many layers as the recipe's `layer_range`s need (at
   least 4), and carry a real tokenizer (a word-level `tokenizers` tokenizer with special
   tokens, saved with transformers). A reference to another document's `name:` (a stage of
   a multi-stage recipe) and a `+lora` part are left as written.
2. mergekit 0.1.5 (its side environment, see tests/parity/make_goldens.py) runs
   `mergekit-yaml` on the rewritten recipe; then `remerge merge` runs on the same text.
3. Outcome, one line per recipe:
   - identical: same tensors (names, dtypes, shapes, bytes), same config.json, same
     tokenizer files;
   - random: a random method (DARE, DELLA...): the bytes cannot match, so `remerge audit`
     checks mergekit's output element by element against the recipe;
   - different: what differs;
   - refused: remerge refused while mergekit ran, with remerge's one-line reason;
   - both refused: mergekit failed too (its last error line), e.g. YAML that does not parse.

    .venv/bin/python bench/real_recipes.py                        # every recipe
    .venv/bin/python bench/real_recipes.py --only 009 --only 095  # some
    .venv/bin/python bench/real_recipes.py --markdown docs/REAL_RECIPES.md

Nothing here imports the remerge package (it runs its command line); building the
stand-ins needs torch, transformers and tokenizers (the project's environment has them).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CORPUS = REPO.parent / "shared" / "real-recipes"
MERGEKIT_VENV = Path.home() / ".cache" / "remerge-parity" / "venv-0.1.5"
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear", "arcee_fusion"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --- the recipes -----------------------------------------------------------------------------


def corpus_rows(corpus: Path) -> dict[str, dict[str, str]]:
    with open(corpus / "index.tsv", newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f, delimiter="\t")}


def documents(text: str) -> list[Any]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def references(doc: Any) -> list[tuple[str, int]]:
    """(reference, layers it needs) for every model a recipe document names."""
    out: list[tuple[str, int]] = []
    if not isinstance(doc, dict):
        return out
    for entry in doc.get("models") or []:
        if isinstance(entry, dict) and isinstance(entry.get("model"), str):
            out.append((entry["model"], 0))
    for piece in doc.get("slices") or []:
        for src in (piece or {}).get("sources") or [] if isinstance(piece, dict) else []:
            if isinstance(src, dict) and isinstance(src.get("model"), str):
                rng = src.get("layer_range") or [0, 0]
                out.append((src["model"], int(rng[1]) if isinstance(rng, list) and len(rng) == 2 else 0))
    if isinstance(doc.get("base_model"), str):
        out.append((doc["base_model"], 0))
    return out


def plain(ref: str) -> str:
    """The model part of a reference (`model+lora` -> model; `model@rev` kept whole)."""
    return ref.split("+", 1)[0].strip()


def rewrite(doc: Any, mapping: dict[str, str]) -> Any:
    """The document with each model reference replaced by its stand-in's folder."""
    def swap(ref: str) -> str:
        head, plus, tail = ref.partition("+")
        return mapping.get(head.strip(), head) + (plus + tail if plus else "")
    if not isinstance(doc, dict):
        return doc
    doc = json.loads(json.dumps(doc))  # a deep copy of plain data
    for entry in doc.get("models") or []:
        if isinstance(entry, dict) and isinstance(entry.get("model"), str):
            entry["model"] = swap(entry["model"])
    for piece in doc.get("slices") or []:
        for src in (piece or {}).get("sources") or [] if isinstance(piece, dict) else []:
            if isinstance(src, dict) and isinstance(src.get("model"), str):
                src["model"] = swap(src["model"])
    if isinstance(doc.get("base_model"), str):
        doc["base_model"] = swap(doc["base_model"])
    return doc


# --- stand-in models -------------------------------------------------------------------------


def family_of(row: dict[str, str], text: str) -> str:
    family = (row.get("architecture_family") or "llama").lower()
    notes = (row.get("notes", "") + " " + text).lower()
    if family == "other":
        if "mixtral" in notes or "8x7b" in notes:
            return "mixtral"
        if "gpt2" in notes:
            return "gpt2"
        return "llama"
    return {"phi": "phi3"}.get(family, family)


VOCAB = 96  # word-level vocabulary of the stand-in tokenizer (specials included)


def build_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = [f"w{i}" for i in range(VOCAB - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(folder)


def tiny_config(family: str, layers: int):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=4, n_positions=64,
                             bos_token_id=1, eos_token_id=2)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
           "phi3": tf.Phi3Config, "mixtral": tf.MixtralConfig}[family]
    extra = {"num_key_value_heads": 2}
    if family == "mixtral":
        extra.update(num_local_experts=2, num_experts_per_tok=1)
    if family == "phi3":
        extra.update(pad_token_id=3)
    return cls(**common, **extra)


def build_stand_in(folder: Path, family: str, layers: int, ref: str, dtype: str) -> None:
    """A tiny model: the family base (seeded by family and layers) plus a small change seeded
    by the reference (the family base itself for seed 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(int(hashlib.sha256(f"{family}/{layers}".encode()).hexdigest()[:8], 16))
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers))
    gen = torch.Generator().manual_seed(int(hashlib.sha256(ref.encode()).hexdigest()[:8], 16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01 * p.detach().abs().mean().clamp_min(1e-3))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(tmp, safe_serialization=True)
    build_tokenizer(tmp)
    tmp.rename(folder)


# --- running both tools ----------------------------------------------------------------------


def mergekit_env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(root / "hf-home")}


def run(cmd: list[str], log: Path, env: dict[str, str], cwd: Path, timeout: int) -> tuple[int, str]:
    """(exit status, the last meaningful line of the output)."""
    setarch = ["setarch", platform.machine(), "-R"] if shutil.which("setarch") else []
    try:
        proc = subprocess.run(setarch + cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        out, rc = f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout} s", 124
    log.write_text(out)
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and not ln.startswith(("  ", "Traceback"))]
    return rc, (lines[-1] if lines else "")[:300]


def tensor_files(folder: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """{tensor: (dtype, shape, sha256 of its bytes)} of a folder's safetensors files."""
    import struct

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            start = 8 + n
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                f.seek(start + e["data_offsets"][0])
                data = f.read(e["data_offsets"][1] - e["data_offsets"][0])
                out[name] = (e["dtype"], tuple(e["shape"]), hashlib.sha256(data).hexdigest())
    return out


def compare(theirs: Path, ours: Path) -> list[str]:
    """What differs between two output folders (empty: identical)."""
    problems = []
    a, b = tensor_files(theirs), tensor_files(ours)
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        problems.append(f"tensor names differ (mergekit only: {only_a[:3]}, remerge only: {only_b[:3]})")
    differing = [n for n in sorted(set(a) & set(b)) if a[n] != b[n]]
    if differing:
        problems.append(f"{len(differing)} of {len(a)} tensors differ, e.g. {differing[0]}")
    for name in ("config.json", *TOKENIZER_FILES):
        pa, pb = theirs / name, ours / name
        if pa.is_file() != pb.is_file():
            problems.append(f"{name} only in {'mergekit' if pa.is_file() else 'remerge'}'s output")
        elif pa.is_file() and json.loads(pa.read_text()) != json.loads(pb.read_text()):
            problems.append(f"{name} differs")
    return problems


def final_stage(docs: list[Any]) -> str | None:
    """The stage of a multi-document recipe that is the final model: None for the unnamed
    document (mergekit-multi writes it to --out-path), else the named stage that no other
    stage reads (it stays in the intermediate folder)."""
    names = [d.get("name") for d in docs if isinstance(d, dict)]
    if None in names:
        return None
    read = {plain(ref) for d in docs for ref, _ in references(d)}
    read |= {plain(d["base_model"]) for d in docs if isinstance(d, dict) and isinstance(d.get("base_model"), str)}
    unread = [n for n in names if n not in read]
    return unread[-1] if unread else names[-1]


def one_recipe(name: str, text: str, row: dict[str, str], work: Path, mergekit: Path,
               remerge: str, timeout: int) -> dict[str, Any]:
    result: dict[str, Any] = {"recipe": name, "method": row.get("merge_method", "?"),
                              "slices": row.get("uses_slices", "?"), "family": "?"}
    try:
        docs = documents(text)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        return {**result, "outcome": "both refused", "why": f"not valid YAML ({first})"}
    family = family_of(row, text)
    result["family"] = family
    stage_names = {d.get("name") for d in docs if isinstance(d, dict) and d.get("name")}
    needs: dict[str, int] = {}
    for doc in docs:
        for ref, layers in references(doc):
            if plain(ref) not in stage_names:
                needs[plain(ref)] = max(needs.get(plain(ref), 0), layers)
    layers = max([4, *needs.values()])
    dtype = "bfloat16"
    mapping = {}
    for i, ref in enumerate(sorted(needs)):
        folder = work / "stand-ins" / f"{family}-{layers}L-{hashlib.sha256(ref.encode()).hexdigest()[:10]}"
        build_stand_in(folder, family, layers, ref, dtype)
        mapping[ref] = str(folder)
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    rewritten = [rewrite(d, mapping) for d in docs]
    recipe = run_dir / "recipe.yml"
    recipe.write_text(yaml.safe_dump_all(rewritten, sort_keys=False) if len(rewritten) > 1
                      else yaml.safe_dump(rewritten[0] if rewritten else {}, sort_keys=False))
    t0 = time.monotonic()
    mk_out = run_dir / "mergekit"
    if len(rewritten) > 1:  # several stages: mergekit-multi, the final one where it writes it
        final = final_stage(rewritten)
        command = [str(mergekit / "bin" / "mergekit-multi"), str(recipe), "-I", str(run_dir / "mergekit-stages")]
        command += ["--out-path", str(mk_out)] if final is None else []
        mk_out = mk_out if final is None else run_dir / "mergekit-stages" / final
    else:
        command = [str(mergekit / "bin" / "mergekit-yaml"), str(recipe), str(mk_out), "--copy-tokenizer"]
    mk_rc, mk_line = run(command, run_dir / "mergekit.log", mergekit_env(work), run_dir, timeout)
    rm_rc, rm_line = run([remerge, "merge", str(recipe), str(run_dir / "remerge")], run_dir / "remerge.log",
                         os.environ.copy(), run_dir, timeout)
    result["seconds"] = round(time.monotonic() - t0, 1)
    if mk_rc != 0:
        return {**result, "outcome": "both refused" if rm_rc != 0 else "mergekit refused",
                "why": f"mergekit: {mk_line}" + (f"; remerge: {rm_line}" if rm_rc else "")}
    if rm_rc != 0:
        return {**result, "outcome": "refused", "why": rm_line}
    if row.get("merge_method") in RANDOM_METHODS or any(
            isinstance(d, dict) and d.get("merge_method") in RANDOM_METHODS for d in docs):
        a_rc, a_line = run([remerge, "audit", str(mk_out), str(run_dir / "audit"),
                            "--recipe", str(recipe)], run_dir / "audit.log", os.environ.copy(), run_dir, timeout)
        verdict = json.loads((run_dir / "audit" / "audit.json").read_text())["verdict"] \
            if (run_dir / "audit" / "audit.json").is_file() else a_line
        return {**result, "outcome": "random", "why": f"audit of mergekit's output: {verdict}"}
    problems = compare(mk_out, run_dir / "remerge")
    return {**result, "outcome": "different" if problems else "identical", "why": "; ".join(problems)}


# --- the table -------------------------------------------------------------------------------

ORDER = ("identical", "random", "different", "refused", "mergekit refused", "both refused")


def table(rows: list[dict[str, Any]]) -> str:
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ORDER}
    lines = ["| outcome | recipes |", "|---|---:|", *[f"| {k} | {v} |" for k, v in counts.items() if v],
             f"| **total** | **{len(rows)}** |", "",
             "| recipe | method | slices | family | outcome | why |", "|---|---|---|---|---|---|"]
    for r in rows:
        why = str(r.get("why", "")).replace("|", "\\|")
        lines.append(f"| {r['recipe']} | {r['method']} | {r['slices']} | {r['family']} | {r['outcome']} | {why} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--mergekit-venv", type=Path, default=MERGEKIT_VENV)
    p.add_argument("--out", type=Path, default=HERE / "out" / "real-recipes")
    p.add_argument("--only", action="append", default=[], metavar="NNN", help="recipe number; repeat")
    p.add_argument("--timeout", type=int, default=300, help="seconds per tool run")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not (args.corpus / "recipes").is_dir():
        print(f"no corpus at {args.corpus}: nothing to do (it is a development corpus, not shipped)")
        return 0
    if not (args.mergekit_venv / "bin" / "mergekit-yaml").is_file():
        print(f"no mergekit at {args.mergekit_venv}: create it with python3.11 tests/parity/make_goldens.py "
              "--versions 0.1.5 --models-only", file=sys.stderr)
        return 2
    remerge = str(Path(sys.executable).with_name("remerge"))
    index = corpus_rows(args.corpus)
    files = sorted(p for p in (args.corpus / "recipes").glob("*.yaml")
                   if not args.only or p.stem in args.only)
    rows = []
    for path in files:
        row = one_recipe(path.stem, path.read_text(encoding="utf-8"), index.get(path.name, {}), args.out,
                         args.mergekit_venv, remerge, args.timeout)
        print(f"{row['recipe']}: {row['outcome']}: {row.get('why', '')}", flush=True)
        rows.append(row)
    text = table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
