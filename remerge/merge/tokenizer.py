"""Tokenizer merging and chat templates, as mergekit 0.1.5 does them.

    parse_tokenizer(data, reference) -> TokenizerSpec | None   a recipe's `tokenizer_source:` / `tokenizer:`
    vocab_layout(recipe, folders) -> dict              the plan's record: every model's rows per token
    permute_embeddings(tensors, layout) -> tensors     one embedding tensor of each model, re-rowed
    write_tokenizer_files(recipe, folders, out_dir)    -> (file names, config.json's vocab_size | None)

What mergekit 0.1.5 does (mergekit/tokenizer/{build,embed,config}.py, merge.py; tests/parity/
tokenizer/ holds its outputs):

- The output vocabulary. `base`: the base model's tokenizer (else the first model's). A model
  reference: that model's tokenizer. `union`: the base's tokenizer, saved and reloaded, then
  `add_tokens` of every other model's tokens it lacks, and then every model's added tokens
  (`added_tokens_decoder`, with their flags). mergekit takes the other models' plain tokens in
  the order of `get_vocab()`, a Rust HashMap's (random per process): with more than one such
  token, mergekit's ids for them differ from run to run. remerge takes them in each model's id
  order (one of mergekit's possible outputs; the parity test compares those by token). The
  `tokenizer:` block's `tokens` are then added (`add_tokens`) when absent.
- A model's rows for the output token t (its "permutation"): the row of t in that model's own
  tokenizer, or none. A tokenizer's id at or beyond the model's `vocab_size` makes mergekit
  fail (KeyError), and so does `source: base` with a token the base lacks (mergekit adds it to
  the base's own tokenizer object); remerge refuses both.
- Each embedding tensor (embed_tokens, lm_head: the architecture's `embeddings`), for the
  models that have it, in the compute dtype, before the method runs: a token every model has
  keeps each model's own row. A token some model lacks (or a `force`d one) gets one row for all
  models lacking it: its `tokens:` setting (a model's row for it; `{kind: zero}`; `{kind:
  model_token, model, token | token_id}`: a row of that model's original tensor), else the
  only model that has it, else the base's row if the base has it, else the mean of the models
  that have it (summed one by one in the dtype, then divided); none has it: zeros.
  `pad_to_multiple_of` rounds the rows up; the extra rows are the mean of the others.
- Files: the output tokenizer (chat template set) written by transformers' `save_pretrained`
  (tokenizer.json, tokenizer_config.json, chat_template.jinja), nothing else (no
  special_tokens_map.json, no generation_config.json); config.json's `vocab_size` = the
  vocabulary, rounded up as the rows are.
- `chat_template` without a tokenizer setting: the donor's tokenizer is loaded and saved the
  same way (not copied). `auto`: the most frequent template of the models (stripped; a tie goes
  to the first model of mergekit's set, arbitrary: remerge takes recipe order, with a
  warning); a name of `chat_templates/` (mergekit's built-in files, byte for byte); any other
  text with a `{` of at least 20 characters: itself. Anything else fails after the merge in
  mergekit, which then writes no tokenizer files at all (an error line); remerge does the same,
  with a warning.

Tokenizers are loaded with `local_files_only=True` (remerge never reaches the hub here), which
transformers records in tokenizer_config.json, as mergekit run offline (HF_HUB_OFFLINE=1) does.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from remerge.errors import ModelError, RecipeError

if TYPE_CHECKING:
    import torch

    from remerge.merge.recipe import Recipe

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
SOURCES = ("union", "base")  # besides a model reference


# --- the recipe's settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSource:
    """One entry of `tokenizer: tokens:`: where the token's row comes from, and whether it
    replaces the rows of models that have the token (`force`)."""

    kind: str | None  # "model" | "zero" | "model_token" | None (not given)
    model: str | None = None
    token: str | None = None  # model_token: the token in that model's own vocabulary
    token_id: int | None = None  # model_token: the row of that model's tensor
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    source: str  # "union" | "base" | a model reference
    tokens: tuple[tuple[str, TokenSource], ...] = ()  # in recipe order
    pad_to_multiple_of: int | None = None

    @property
    def models(self) -> tuple[str, ...]:
        """The models it names (the source, the tokens' sources)."""
        named = [self.source] if self.source not in SOURCES else []
        named += [s.model for _, s in self.tokens if s.model]
        return tuple(dict.fromkeys(named))


def parse_tokenizer(data: Mapping[str, Any], reference) -> TokenizerSpec | None:
    """`tokenizer_source` or the `tokenizer:` block of a recipe mapping, checked as mergekit's
    models check them (`reference` checks a model reference)."""
    source, block = data.get("tokenizer_source"), data.get("tokenizer")
    if source and block:
        raise RecipeError("`tokenizer_source` and `tokenizer:` together: give one of them (mergekit: "
                          "'Cannot specify both tokenizer_source and tokenizer')")
    if source:
        return TokenizerSpec(_source(source, "tokenizer_source", reference))
    if block is None:
        return None
    if not isinstance(block, dict) or set(block) - {"source", "tokens", "pad_to_multiple_of"}:
        raise RecipeError("`tokenizer:` is a mapping of `source` (union, base or a model), `tokens` "
                          "and `pad_to_multiple_of`")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise RecipeError(f"tokenizer.pad_to_multiple_of must be a positive whole number, not {pad!r}")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise RecipeError("tokenizer.tokens is a mapping of token: {source: ..., force: ...}")
    return TokenizerSpec(
        _source(block.get("source", "union"), "tokenizer.source", reference),
        tuple((str(tok), _token_source(f"tokenizer.tokens[{tok!r}]", cfg, reference))
              for tok, cfg in tokens.items()),
        pad)


def _source(value: Any, where: str, reference) -> str:
    return value if value in SOURCES else reference(value, where)


def _token_source(where: str, raw: Any, reference) -> TokenSource:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict) or set(raw) - {"source", "force"}:
        raise RecipeError(f"{where} is a mapping of `source` and `force`")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise RecipeError(f"{where}.force must be true or false")
    src = raw.get("source")
    if src is None:
        return TokenSource(None, force=force)
    if isinstance(src, str):
        return TokenSource("model", reference(src, f"{where}.source"), force=force)
    kind = src.get("kind") if isinstance(src, dict) else None
    if kind == "zero" and set(src) == {"kind"}:
        return TokenSource("zero", force=force)
    if kind == "model_token" and "model" in src and not set(src) - {"kind", "model", "token", "token_id"}:
        if ("token" in src) == ("token_id" in src):
            raise RecipeError(f"{where}.source: give one of `token` and `token_id` (mergekit: "
                              "'token_id or token must be specified' / 'only one of ...')")
        token_id = src.get("token_id")
        if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)):
            raise RecipeError(f"{where}.source.token_id must be a whole number")
        return TokenSource("model_token", reference(src["model"], f"{where}.source.model"),
                           token=None if "token" not in src else str(src["token"]),
                           token_id=token_id, force=force)
    raise RecipeError(f"{where}.source: a model, {{kind: zero}} or {{kind: model_token, model: ..., "
                      f"token: ...}}, not {src!r}")


def check_release(recipe: "Recipe") -> None:
    """Refuse tokenizer settings under a release whose handling remerge does not follow."""
    if (recipe.tokenizer or recipe.chat_template) and not recipe.release.tokenizers:
        key = "chat_template" if recipe.tokenizer is None else "tokenizer settings"
        raise RecipeError(f"{key}: remerge follows them as mergekit 0.1.5 does only; this recipe "
                          f"follows mergekit {recipe.release.version}")


# --- tokenizers ----------------------------------------------------------------------------------


def _transformers():
    from remerge.merge.model_files import _transformers as imported  # waits for a background import

    return imported()


def load_tokenizer(folder: str | Path):
    """A model's tokenizer as mergekit loads it (fast), never from the hub."""
    try:
        return _transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises many kinds: the folder has no usable tokenizer
        raise ModelError(f"cannot load the tokenizer of {folder}: {err}") from None


def config_vocab_size(folder: str | Path) -> int | None:
    """config.json's `vocab_size` (mergekit's `get_vocab_size`), None when it has none."""
    import json

    try:
        value = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


def _ordered(vocab: Mapping[str, int]) -> list[str]:
    """A vocabulary's tokens in id order (get_vocab's own order is random per process)."""
    return sorted(vocab, key=vocab.__getitem__)


def _union(base_tok, others: Mapping[str, Any], sizes: Mapping[str, int]):
    """mergekit's union: the base's tokenizer saved and reloaded, the other models' tokens it
    lacks added (in each model's id order), then every model's added tokens (first settings
    win). `others`: model -> tokenizer, the base first; `sizes`: model -> vocab_size."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ref, tok in others.items():
        vocab = tok.get_vocab()
        for token in _ordered(vocab):
            if vocab[token] < sizes[ref]:
                plain.setdefault(token)
        for index, info in sorted(tok.added_tokens_decoder.items()):
            if index < sizes[ref] and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory(prefix="remerge-tokenizer-") as tmp:
        base_tok.save_pretrained(tmp, legacy_format=False, safe_serialization=True)
        out = _transformers().AutoTokenizer.from_pretrained(tmp, use_fast=True, local_files_only=True)
    base_vocab = base_tok.get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class Tokenizers:
    """The output tokenizer and every model's own vocabulary (token -> id) and vocab_size."""

    output: Any
    vocabs: dict[str, dict[str, int]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


def build_tokenizers(recipe: "Recipe", folders: Mapping[str, str | Path]) -> Tokenizers:
    """The output tokenizer as mergekit builds it, and the inputs' vocabularies."""
    spec = recipe.tokenizer
    missing = [ref for ref in spec.models if ref not in folders]
    if missing:
        raise RecipeError(f"the tokenizer settings name {', '.join(missing)}, which the recipe does not "
                          "merge; remerge reads only the merged models: name one of them")
    base = recipe.base_model or recipe.inputs[0]
    toks = {base: load_tokenizer(folders[base])}
    for ref in recipe.inputs:
        if ref != base:
            try:
                toks[ref] = load_tokenizer(folders[ref])
            except ModelError as err:  # mergekit: "Assuming same as <base>"
                log.warning("%s; taking the base's vocabulary for it, as mergekit does", err)
    vocabs = {ref: toks.get(ref, toks[base]).get_vocab() for ref in recipe.inputs}
    sizes = {ref: config_vocab_size(folders[ref]) or len(vocabs[ref]) for ref in recipe.inputs}
    if any(i >= sizes[base] for i in vocabs[base].values()):
        raise ModelError(f"model {base}: its tokenizer has tokens beyond its vocab_size {sizes[base]}; "
                         "mergekit strips them (BPE only), which remerge does not do")
    if spec.source == "base":
        out = toks[base]
        new = [tok for tok, _ in spec.tokens if tok not in vocabs[base]]
        if new:
            raise RecipeError(
                f"tokenizer: source base with new token(s) {', '.join(map(repr, new))}: mergekit "
                "0.1.5 adds them to the base's own tokenizer and then fails (KeyError); use "
                "`source: union`, whose vocabulary is the base's plus the others' tokens")
    elif spec.source == "union":
        out = _union(toks[base], toks, sizes)
    else:
        out = load_tokenizer(folders[spec.source])
    existing = set(out.get_vocab())
    for tok, _ in spec.tokens:
        if tok not in existing:
            out.add_tokens(tok)
            existing.add(tok)
    return Tokenizers(out, vocabs, sizes)


def padded(count: int, multiple: int | None) -> int:
    """The rows of `count` tokens rounded up to `multiple` (mergekit's pad_to_multiple_of)."""
    return count if not multiple or count % multiple == 0 else (count // multiple + 1) * multiple


# --- the plan's record ---------------------------------------------------------------------------


def _runs(rows: list[int]) -> list[list[int]]:
    """[out_start, in_start, length] for each run of consecutive rows (out t reads in rows[t];
    -1: none), so that an unchanged vocabulary is one run in the plan, not 128k numbers."""
    runs: list[list[int]] = []
    for out, src in enumerate(rows):
        if src < 0:
            continue
        if runs and runs[-1][0] + runs[-1][2] == out and runs[-1][1] + runs[-1][2] == src:
            runs[-1][2] += 1
        else:
            runs.append([out, src, 1])
    return runs


def rows_of(layout: Mapping[str, Any], ref: str) -> list[int]:
    """Model `ref`'s row for every output token (-1: it lacks the token)."""
    rows = [-1] * layout["tokens"]
    for out, src, n in layout["rows"][ref]:
        rows[out:out + n] = range(src, src + n)
    return rows


def vocab_layout(recipe: "Recipe", folders: Mapping[str, str | Path]) -> dict[str, Any]:
    """What a shard job needs to re-row an embedding tensor (JSON, in the plan): the output's
    rows (`size`, padding included) and tokens, each model's row per output token (runs), the
    `tokens:` settings by output id, the base."""
    built = build_tokenizers(recipe, folders)
    vocab = built.output.get_vocab()
    order = _ordered(vocab)
    if [vocab[t] for t in order] != list(range(len(order))):
        raise ModelError("the output tokenizer's ids are not 0..n-1; remerge cannot lay out its rows")
    rows = {}
    for ref in recipe.inputs:
        own, size = built.vocabs[ref], built.sizes[ref]
        beyond = [t for t in order if own.get(t, -1) >= size]
        if beyond:
            raise ModelError(f"model {ref}: its tokenizer gives {beyond[0]!r} the id {own[beyond[0]]}, "
                             f"beyond its vocab_size {size}; mergekit 0.1.5 fails on it (KeyError)")
        rows[ref] = [own.get(t, -1) for t in order]
    configs = []
    for tok, src in recipe.tokenizer.tokens:
        row = None
        if src.kind == "model_token":
            row = src.token_id
            if row is None:
                if src.token not in built.vocabs[src.model]:
                    raise RecipeError(f"tokenizer.tokens[{tok!r}]: token {src.token!r} is not in the "
                                      f"vocabulary of {src.model} (mergekit: an AssertionError)")
                row = built.vocabs[src.model][src.token]
        elif src.kind == "model" and rows[src.model][vocab[tok]] < 0:
            raise RecipeError(f"tokenizer.tokens[{tok!r}]: model {src.model} has no such token "
                              "(mergekit: an AssertionError); name a model that has it, or use "
                              "{kind: model_token, ...}")
        elif src.kind is None and (src.force or any(r[vocab[tok]] < 0 for r in rows.values())):
            raise RecipeError(f"tokenizer.tokens[{tok!r}] has no source, and some model lacks the "
                              "token (or it is forced): mergekit fails (NotImplementedError); give "
                              "it a source")
        configs.append([vocab[tok], src.force, src.kind, src.model, row])
    return {"size": padded(len(order), recipe.tokenizer.pad_to_multiple_of), "tokens": len(order),
            "base": recipe.base_model, "rows": {ref: _runs(r) for ref, r in rows.items()},
            "configs": configs}


# --- one tensor ----------------------------------------------------------------------------------


def _fills(layout: Mapping[str, Any], rows: Mapping[str, list[int]]) -> dict[int, tuple]:
    """Output token -> where the row of the models lacking it comes from, for the models that
    have this tensor (`rows`, in order), as mergekit assigns it: ("model", ref, row), ("zero",),
    ("average",), or ("none",) for a `tokens:` entry without a source; only tokens some model
    lacks, and the `force`d ones."""
    base = layout["base"]
    models = list(rows)
    given = {c[0]: c for c in layout["configs"]}
    fills: dict[int, tuple] = {}
    for t in range(layout["tokens"]):
        have = [m for m in models if rows[m][t] >= 0]
        cfg = given.get(t)
        if cfg is not None:
            if not cfg[1] and len(have) == len(models):
                continue
            _, _, kind, model, row = cfg
            if model is not None and model not in rows:
                raise ModelError(f"token {t}: its source {model} lacks this tensor (mergekit: "
                                 "'requires a vocabulary weight from model ...')")
            if kind == "model":
                fills[t] = ("model", model, rows[model][t])
            elif kind == "model_token":
                fills[t] = ("model", model, row)
            else:
                fills[t] = ("zero",) if kind == "zero" else ("none",)
        elif len(have) == len(models):
            continue
        elif len(have) == 1:
            fills[t] = ("model", have[0], rows[have[0]][t])
        elif not have:
            fills[t] = ("zero",)
        elif base in rows and rows[base][t] >= 0:
            fills[t] = ("model", base, rows[base][t])
        else:
            fills[t] = ("average",)
    return fills


def permute_embeddings(tensors: Mapping[str, "torch.Tensor"], layout: Mapping[str, Any]
                       ) -> dict[str, "torch.Tensor"]:
    """Each model's embedding tensor ([its rows, ...]) re-rowed for the output vocabulary
    ([layout size, ...]), in the models' promoted dtype, as mergekit's PermutedVocabulary does
    (module docstring). `tensors`: the models that have this tensor, in the plan's order (the
    order of a token's mean; mergekit's is a hash order)."""
    import torch

    models = list(tensors)
    dtype = tensors[models[0]].dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    tensors = {m: t.to(dtype) for m, t in tensors.items()}
    rows = {m: rows_of(layout, m) for m in models}
    for m in models:
        if max(rows[m], default=-1) >= tensors[m].shape[0]:
            raise ModelError(f"model {m}: its tokenizer names row {max(rows[m])} of a tensor of "
                             f"{tensors[m].shape[0]} rows")
    n, shape = layout["tokens"], tuple(tensors[models[0]].shape[1:])
    fills = _fills(layout, rows)
    defaults = {t: _default_row(fill, t, tensors, rows, shape, dtype) for t, fill in fills.items()}
    forced = {c[0] for c in layout["configs"] if c[1]}
    out = {}
    for m in models:
        new = torch.zeros((layout["size"], *shape), dtype=dtype)
        own = torch.tensor(rows[m])
        keep = own >= 0
        if forced:
            keep[list(forced)] = False
        new[:n][keep] = tensors[m][own[keep]]
        kept = keep.tolist()
        filled = [t for t in defaults if not kept[t]]
        if filled:
            new[filled] = torch.stack([defaults[t] for t in filled])
        lacking = [t for t in range(n) if not kept[t] and t not in defaults]
        if lacking:  # mergekit logs an error and leaves zeros
            log.error("no embedding for %d token(s) in model %s (first: id %d): zeros",
                      len(lacking), m, lacking[0])
        if layout["size"] > n:
            new[n:] = torch.mean(new[:n], dim=0)  # vocab expansion: the mean of the real rows
        out[m] = new
    return out


def _default_row(fill: tuple, token: int, tensors, rows, shape, dtype) -> "torch.Tensor":
    """The row the models lacking `token` get ([hidden...], in `dtype`)."""
    import torch

    if fill[0] == "model":
        _, model, row = fill
        if not 0 <= row < tensors[model].shape[0]:
            raise ModelError(f"token {token}: row {row} is out of range for model {model}")
        return tensors[model][row]
    if fill[0] == "zero":
        return torch.zeros(shape, dtype=dtype)
    if fill[0] == "none":
        raise RecipeError(f"token {token}: a `tokens:` entry without a source for a token some model "
                          "lacks (mergekit: NotImplementedError); give it a source")
    embed = torch.zeros(shape, dtype=dtype)  # the mean, summed one model at a time in the dtype
    count = 0
    for m, t in tensors.items():
        if rows[m][token] >= 0:
            embed = embed + t[rows[m][token]]
            count += 1
    embed /= count
    return embed


# --- files ---------------------------------------------------------------------------------------


def builtin_or_literal(value: str) -> str:
    """A `chat_template` other than `auto`: a built-in name's file, or the template itself;
    RecipeError where mergekit fails ('Invalid chat template')."""
    builtin = TEMPLATES / f"{value}.jinja"
    # mergekit's test, plus no "/" (a name never holds one; a path must not read other files)
    if len(value) < 256 and "\n" not in value and "{" not in value and "/" not in value \
            and builtin.is_file():
        return builtin.read_text(encoding="utf-8")
    if len(value) < 20 or "{" not in value:
        names = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.jinja")))
        raise RecipeError(f"chat_template {value!r} is neither `auto`, a built-in name ({names}), nor a "
                          "template of 20 characters or more with a `{` (mergekit: 'Invalid chat "
                          "template')")
    return value


def check_chat_template(recipe: "Recipe") -> None:
    """With a tokenizer setting, an invalid chat_template makes mergekit fail after the merge:
    refused before it. Without one, mergekit merges and writes no tokenizer files
    (`write_tokenizer_files`)."""
    if recipe.tokenizer is not None and recipe.chat_template and recipe.chat_template != "auto":
        try:
            builtin_or_literal(recipe.chat_template)
        except RecipeError as err:
            raise RecipeError(f"{err}; with a tokenizer setting mergekit 0.1.5 fails after merging") from None


def chat_template_text(recipe: "Recipe", folders: Mapping[str, str | Path]) -> str | None:
    """The template mergekit writes for `chat_template` (None: none set, or `auto` found none)."""
    value = recipe.chat_template
    if not value:
        return None
    return _auto_template(recipe, folders) if value == "auto" else builtin_or_literal(value)


def _auto_template(recipe: "Recipe", folders: Mapping[str, str | Path]) -> str | None:
    """The most frequent chat template of the models, stripped (None: none has one)."""
    found = []
    for ref in recipe.inputs:
        try:
            template = load_tokenizer(folders[ref]).chat_template
        except ModelError as err:
            log.warning("chat_template auto: %s", err)
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    if not found:
        return None
    counts = Counter(found).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        log.warning("chat_template auto: several templates are as frequent; taking the first "
                    "model's in recipe order (mergekit takes the first of an unordered set)")
    return counts[0][0]


def writes_tokenizer(recipe: "Recipe") -> bool:
    """Whether the tokenizer files are written by transformers (a tokenizer setting or a chat
    template) rather than copied from the donor."""
    return recipe.tokenizer is not None or bool(recipe.chat_template)


def write_tokenizer_files(recipe: "Recipe", folders: Mapping[str, str | Path], out_dir: Path
                          ) -> tuple[list[str], int | None]:
    """The tokenizer files mergekit writes for a tokenizer setting or a chat template (their
    names), and the vocab_size config.json then says (None: the donor's)."""
    if recipe.tokenizer is not None:
        tok = build_tokenizers(recipe, folders).output
        vocab_size = padded(len(tok.get_vocab()), recipe.tokenizer.pad_to_multiple_of)
    else:  # the donor's tokenizer, loaded and saved again (not copied)
        vocab_size = None
        try:
            if recipe.chat_template != "auto":
                builtin_or_literal(recipe.chat_template)
            tok = load_tokenizer(folders[recipe.base_model or recipe.inputs[0]])
        except (RecipeError, ModelError) as err:
            log.warning("%s: mergekit merges, then fails to write the tokenizer and writes no "
                        "tokenizer files; so does remerge", err)
            return [], None
    template = chat_template_text(recipe, folders)
    if template is not None:
        tok.chat_template = template
    names = tok.save_pretrained(str(out_dir))
    return sorted(Path(n).name for n in names), vocab_size


def rename_tokenizer(data: dict, rename) -> None:
    """Rename the model references of a recipe mapping's tokenizer settings in place."""
    if data.get("tokenizer_source") not in (None, *SOURCES):
        data["tokenizer_source"] = rename(data["tokenizer_source"])
    block = data.get("tokenizer")
    if not isinstance(block, dict):
        return
    if block.get("source") not in (None, *SOURCES):
        block["source"] = rename(block["source"])
    for cfg in (block.get("tokens") or {}).values():
        src = cfg.get("source") if isinstance(cfg, dict) else None
        if isinstance(src, str):
            cfg["source"] = rename(src)
        elif isinstance(src, dict) and "model" in src:
            src["model"] = rename(src["model"])
