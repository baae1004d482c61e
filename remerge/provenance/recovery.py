"""A published merge's recipe, recovered: a given file, else the published
`mergekit_config.yml`, else a recipe block of its README card.

Cards are written by hand, so a card's recipe comes in many shapes (`recipe_blocks` reads
them all, in card order): YAML fences with or without the `yaml` label, several fences for a
multi-stage merge (later stages name earlier ones), a fence holding two configs without
`---`, a fence that mixes a shell command or LoRA notation with the YAML, a card body that is
bare YAML, fences inside `<details>`, published YAML that does not parse. The frontmatter at
the top (`---` ... `---`) is YAML too, but never a recipe. Cards scraped as text sometimes lose
their line breaks (the seed's reference copy has none): such a block is rebuilt from
mergekit's recipe grammar (`unflatten_recipe`).

`choose_recipe` is the one place that decides which recipe of a card is audited: the only
one, else the last (the stage that produced the published model), with a warning that says
so; its source string names the block."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from remerge.errors import AuditError

log = logging.getLogger(__name__)

_FLAT_BLOCK = re.compile(r"```ya?ml\s+(.*?)```", re.S)
_TOKEN = re.compile(r'"[^"]*"|\'[^\']*\'|\[[^\]]*\]|\{[^}]*\}|\S+')
TOP_KEYS = ("models", "merge_method", "base_model", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "slices", "chat_template")

# A fence opens with 3+ backticks or tildes; a backtick fence's info string holds no backtick
# (so an inline "```code```" at the start of a line is not a fence: CommonMark's rule).
_FENCE_OPEN = re.compile(r"^([ \t]*)(`{3,}|~{3,})(.*)$")
# Fences of these labels may hold a recipe; any other language is code whose strings may
# hold YAML for another purpose (a notebook's config string), never the card's recipe.
RECIPE_LABELS = ("", "yaml", "yml", "text", "txt", "plaintext", "plain", "sh", "bash", "shell",
                 "console")
_KEY = re.compile(r"""^[ \t]*(?:-[ \t]+)?(?:[A-Za-z_][\w.-]*|"[^"]*"|'[^']*')[ \t]*:(?:[ \t]|$)""")
_TOP_KEY = re.compile(r"^([A-Za-z_][\w.-]*)[ \t]*:(?:[ \t]|$)")
_MERGE_METHOD = re.compile(r"^[ \t]*(?:-[ \t]+)?merge_method[ \t]*:[ \t]*\S")
_MODEL_KEY = re.compile(r"^[ \t]*(?:-[ \t]+)?model[ \t]*:[ \t]*\S")
_DOC_SEPARATOR = re.compile(r"^---[ \t]*$")
_DETAILS_OPEN = re.compile(r"<details\b", re.I)
_DETAILS_CLOSE = re.compile(r"</details\s*>", re.I)


def _is_recipe(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data and ("models" in data or "slices" in data)


# --- what a card holds -----------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeDocument:
    """One YAML document of a block (a block of several stages holds one per stage)."""

    text: str
    lines: tuple[int, int]  # card lines, 1-based, inclusive
    data: Any = None  # the parsed document; None when it does not parse
    error: str | None = None  # why it does not parse (with the card line)

    @property
    def parses(self) -> bool:
        return self.error is None

    @property
    def is_recipe(self) -> bool:
        """A mergekit recipe: `merge_method` and `models` or `slices`."""
        return self.parses and _is_recipe(self.data)


@dataclass(frozen=True)
class RecipeBlock:
    """A recipe block of a card, as published (`text`) and as YAML (`recipe`, the block less
    what is not YAML around it: a shell command, LoRA notation, prose the fence ran into)."""

    kind: str  # "fenced", "unfenced" (bare YAML in the card body), "flattened" (line breaks lost)
    text: str  # verbatim: the fence's content, or the card's lines
    lines: tuple[int, int]  # card lines of `text`, 1-based, inclusive
    recipe: str  # the YAML part of `text` (rebuilt for a flattened block)
    recipe_lines: tuple[int, int]
    documents: tuple[RecipeDocument, ...]
    fence: int | None = None  # the fence's number among all the card's fences (1-based)
    label: str | None = None  # the fence's info string ("yaml", "" for an unlabelled fence)
    in_details: bool = False  # inside a <details> section
    split_key: str | None = None  # two configs without '---': the repeated top-level key split them

    @property
    def parses(self) -> bool:
        return all(d.parses for d in self.documents)

    @property
    def is_recipe(self) -> bool:
        return any(d.is_recipe for d in self.documents)

    @property
    def error(self) -> str | None:
        return next((d.error for d in self.documents if d.error), None)

    @property
    def extra_text(self) -> bool:
        """The block holds more than its YAML (a command, notation, prose)."""
        return _trim(self.text) != _trim(self.recipe)

    def where(self) -> str:
        """Where the block is, in words: 'lines 40-62', 'unfenced, lines 5-13', ..."""
        if self.kind == "flattened":
            return "its line breaks lost: rebuilt from mergekit's recipe grammar"
        parts = ["unfenced"] if self.kind == "unfenced" else []
        if self.in_details:
            parts.append("inside <details>")
        span = f"lines {_span(self.recipe_lines)}"
        if self.recipe_lines != self.lines:
            span += f" of the block at lines {_span(self.lines)}"
        return ", ".join([*parts, span])


def _span(lines: tuple[int, int]) -> str:
    return f"{lines[0]}-{lines[1]}" if lines[0] != lines[1] else str(lines[0])


def _trim(text: str) -> str:
    """A text less its surrounding blank lines (the comparison rule of recovered blocks)."""
    lines = text.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


@dataclass(frozen=True)
class _Fence:
    number: int
    open: int  # 0-based line index of the opening marker
    close: int  # 0-based index of the closing marker, or len(lines) when never closed
    label: str
    indent: int


def _frontmatter_end(lines: list[str]) -> int:
    """The index of the first body line: after the `---` ... `---` frontmatter, if any."""
    if lines and lines[0].strip() == "---":
        for i in range(1, len(lines)):
            if lines[i].strip() in ("---", "..."):
                return i + 1
    return 0


def _fences(lines: list[str], start: int) -> list[_Fence]:
    """The card's fenced blocks (CommonMark's rules; an unclosed fence runs to the end)."""
    fences: list[_Fence] = []
    i = start
    while i < len(lines):
        m = _FENCE_OPEN.match(lines[i])
        if m is None or (m.group(2)[0] == "`" and "`" in m.group(3)):
            i += 1
            continue
        marker = m.group(2)
        closing = re.compile(rf"^[ \t]*{re.escape(marker[0])}{{{len(marker)},}}[ \t]*$")
        close = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), len(lines))
        info = m.group(3).strip()
        fences.append(_Fence(len(fences) + 1, i, close, info.split()[0].lower() if info else "",
                             len(m.group(1))))
        i = close + 1
    return fences


def _details_depths(lines: list[str], fenced: set[int]) -> list[int]:
    """How many <details> sections are open at each line (tags inside fences are text)."""
    depth, out = 0, []
    for i, line in enumerate(lines):
        out.append(depth)
        if i not in fenced:
            depth = max(0, depth + len(_DETAILS_OPEN.findall(line)) - len(_DETAILS_CLOSE.findall(line)))
    return out


def _yamlish(line: str, fenced: bool) -> bool:
    """Could this line be part of a recipe? A key, a list item, an indented continuation, a
    comment. Outside a fence a line starting with '#' is a markdown heading, and '---' a rule."""
    if line[:1] in (" ", "\t"):
        return True
    if fenced and (line.startswith("#") or _DOC_SEPARATOR.match(line)):
        return True
    return line == "-" or line.startswith("- ") or bool(_KEY.match(line))


def _runs(lines: list[str], indices: list[int], fenced: bool) -> list[tuple[int, int]]:
    """Maximal runs of recipe-looking lines (blank lines inside a run do not end it), as
    (first, last) indices into `lines`, without surrounding blank lines. `indices` are the
    consecutive candidate lines; a gap in them (a fence) ends a run."""
    runs, first, last, prev = [], None, None, None
    for i in indices:
        line = lines[i]
        contiguous = prev is not None and i == prev + 1
        prev = i
        if first is not None and not contiguous:
            runs.append((first, last))
            first = None
        if not line.strip():
            continue
        if _yamlish(line, fenced):
            if first is None:
                first = i
            last = i
        elif first is not None:
            runs.append((first, last))
            first = None
    if first is not None:
        runs.append((first, last))
    return runs


def _has_merge_method(lines: list[str], run: tuple[int, int]) -> bool:
    return any(_MERGE_METHOD.match(lines[i]) for i in range(run[0], run[1] + 1))


def _recipe_span(lines: list[str], runs: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The YAML part of a fence: from the first run holding `merge_method` to the last, less
    trailing comments (a fence that runs on into the next section reads its markdown heading
    as a YAML comment; a trailing comment is never part of a recipe)."""
    held = [r for r in runs if _has_merge_method(lines, r)]
    if not held:
        return None
    first, last = held[0][0], held[-1][1]
    while last > first and (not lines[last].strip() or lines[last].lstrip().startswith("#")):
        last -= 1
    return first, last


def _plainly_a_recipe(lines: list[str]) -> bool:
    """Bare YAML in a card body is taken as a recipe only on firm evidence (a fence is the
    author saying "this is the config"; prose is not): a `merge_method` and a `model`, and every
    line valid YAML on its own, so prose that imitates YAML ('weight: 0.41 / density: 0.50')
    is not taken, while a recipe whose only fault is its nesting is."""
    if not any(_MERGE_METHOD.match(x) for x in lines) or not any(_MODEL_KEY.match(x) for x in lines):
        return False
    for line in lines:
        if line.strip():
            try:
                yaml.safe_load(line.strip())
            except yaml.YAMLError:
                return False
    return True


def _parse(text: str, first_line: int) -> tuple[Any, str | None]:
    try:
        return yaml.safe_load(text), None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        at = f" (card line {first_line + mark.line})" if mark is not None else ""
        return None, f"{problem}{at}"


def _split_documents(lines: list[str], first: int, last: int
                     ) -> tuple[list[tuple[int, int]], str | None]:
    """The documents of a block, as (first, last) indices: split at `---`, and where a
    top-level key comes again (two configs pasted one after the other without `---`; YAML
    would keep the second's value of each key silently). Such a split moves back to the last
    top-level key that follows a blank line, when there is one in the document (authors
    separate configs by a blank line; a blank line inside a list separates nothing).
    Returns the spans and the repeated key, if one split a document."""
    spans, split_key = [], None
    start, seen, paragraph, after_blank = first, set(), None, False
    for i in range(first, last + 1):
        line = lines[i]
        if _DOC_SEPARATOR.match(line):
            spans.append((start, i - 1))
            start, seen, paragraph, after_blank = i + 1, set(), None, False
            continue
        if not line.strip():
            after_blank = True
            continue
        m = _TOP_KEY.match(line)
        if m is not None and after_blank and i > start:
            paragraph = i
        after_blank = False
        if m is None:
            continue
        if m.group(1) in seen:
            cut = paragraph if paragraph is not None and paragraph > start else i
            spans.append((start, cut - 1))
            split_key = split_key or m.group(1)
            start, paragraph = cut, None
            seen = {k.group(1) for k in map(_TOP_KEY.match, lines[cut:i]) if k}
        seen.add(m.group(1))
    spans.append((start, last))
    out = []
    for a, b in spans:  # without surrounding blank lines; a document of comments only is none
        while a <= b and not lines[a].strip():
            a += 1
        while b >= a and not lines[b].strip():
            b -= 1
        if any(x.strip() and not x.lstrip().startswith("#") for x in lines[a:b + 1]):
            out.append((a, b))
    return out, split_key


def _block(kind: str, lines: list[str], text_span: tuple[int, int], recipe_span: tuple[int, int],
           **where: Any) -> RecipeBlock:
    """A block from the card's lines (indices; already de-indented for a fence)."""
    spans, split_key = _split_documents(lines, *recipe_span)
    documents = []
    for a, b in spans:
        text = "\n".join(lines[a:b + 1]) + "\n"
        data, error = _parse(text, a + 1)
        documents.append(RecipeDocument(text, (a + 1, b + 1), data, error))
    a, b = recipe_span
    return RecipeBlock(
        kind=kind, text="\n".join(lines[text_span[0]:text_span[1] + 1]) + "\n",
        lines=(text_span[0] + 1, text_span[1] + 1),
        recipe="\n".join(lines[a:b + 1]) + "\n", recipe_lines=(a + 1, b + 1),
        documents=tuple(documents), split_key=split_key, **where)


def _flattened_blocks(text: str) -> list[RecipeBlock]:
    """YAML fences whose line breaks were lost (`models: - model: "a" parameters: ...`)."""
    blocks = []
    for flat in _FLAT_BLOCK.findall(text):
        data = unflatten_recipe(flat)
        if _is_recipe(data):
            rebuilt = yaml.safe_dump(data, sort_keys=False)
            blocks.append(RecipeBlock(
                kind="flattened", text=flat, lines=(1, 1), recipe=rebuilt, recipe_lines=(1, 1),
                documents=(RecipeDocument(rebuilt, (1, 1), data),)))
    return blocks


def _fenced_block(lines: list[str], fence: _Fence, in_details: bool) -> RecipeBlock | None:
    """A fence as a recipe block, or None: a fence of another language, or no `merge_method`."""
    if fence.label not in RECIPE_LABELS or fence.open + 1 >= fence.close:
        return None
    # the content, de-indented by the opening marker's indentation (CommonMark); the indices
    # stay the card's, so that every line number is the card's
    content = list(lines)
    for i in range(fence.open + 1, fence.close):
        content[i] = re.sub(rf"^[ \t]{{0,{fence.indent}}}", "", lines[i])
    span = _recipe_span(content, _runs(content, list(range(fence.open + 1, fence.close)), fenced=True))
    if span is None:
        return None
    return _block("fenced", content, (fence.open + 1, fence.close - 1), span,
                  fence=fence.number, label=fence.label, in_details=in_details)


def recipe_blocks(text: str) -> list[RecipeBlock]:
    """Every recipe block of a card, in card order.

    A fence (unlabelled, or labelled as YAML, text or shell) is a recipe block when it holds a
    `merge_method:` line; it is returned whether or not it parses (published YAML is sometimes
    malformed: `parses` and `error` say so). Bare YAML outside the fences and the frontmatter is
    a block only on firmer evidence (`_plainly_a_recipe`). With no such block, fences whose
    line breaks were lost are rebuilt (`unflatten_recipe`)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = _frontmatter_end(lines)
    fences = _fences(lines, start)
    fenced = {i for f in fences for i in range(f.open, min(f.close, len(lines) - 1) + 1)}
    depths = _details_depths(lines, fenced)
    found = [(f.open, b) for f in fences if (b := _fenced_block(lines, f, depths[f.open] > 0))]
    body = [i for i in range(start, len(lines)) if i not in fenced]
    for run in _runs(lines, body, fenced=False):
        if _plainly_a_recipe(lines[run[0]:run[1] + 1]):
            found.append((run[0], _block("unfenced", lines, run, run, in_details=depths[run[0]] > 0)))
    blocks = [b for _, b in sorted(found, key=lambda x: x[0])]
    return blocks or _flattened_blocks(text)


# --- which recipe is audited -----------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The recipe audited: its block and document, and the source string that names them."""

    block: RecipeBlock
    document: RecipeDocument
    source: str
    candidates: int  # how many usable recipes the card holds


def _describe(card: str, blocks: list[RecipeBlock], block: RecipeBlock, doc: RecipeDocument) -> str:
    """The source string: the card's name alone when it holds just one clean recipe block,
    else the block (and document) by number and lines."""
    plain = (len(blocks) == 1 and len(block.documents) == 1 and block.kind == "fenced"
             and not block.extra_text)
    if plain:
        return card
    source = f"{card}, block {blocks.index(block) + 1} of {len(blocks)} ({block.where()})"
    if len(block.documents) > 1:
        n = block.documents.index(doc) + 1
        source += f", document {n} of {len(block.documents)} (lines {_span(doc.lines)})"
    return source


def choose_recipe(blocks: list[RecipeBlock], card: str = "README.md") -> Choice | None:
    """The recipe of a card to audit, or None when no block holds a usable one.

    With one usable recipe, that one; with several (a multi-stage merge: later stages name
    earlier ones), the last: the stage that produced the published model. Whenever something
    was chosen or left out (other stages, blocks that do not parse, text around the YAML), a
    warning says what, so that nothing is guessed silently."""
    usable = [(b, d) for b in blocks for d in b.documents if d.is_recipe]
    if not usable:
        return None
    block, doc = usable[-1]
    choice = Choice(block, doc, _describe(card, blocks, block, doc), len(usable))
    notes = []
    if len({_trim(d.text) for _, d in usable}) > 1:  # the same recipe twice is no choice
        others = "; ".join(_describe(card, blocks, b, d) for b, d in usable[:-1])
        notes.append(f"it holds {len(usable)} recipes (a multi-stage merge?): auditing the last, "
                     f"taken as the stage that produced the published model (also there: {others})")
    if block.split_key is not None:
        notes.append(f"{choice.source} holds configs one after the other without '---' "
                     f"(split where '{block.split_key}:' comes again)")
    broken = [b for b in blocks if not b.parses]
    for b in broken:
        notes.append(f"block {blocks.index(b) + 1} ({b.where()}) is not valid YAML: {b.error}")
    if block.extra_text:
        notes.append(f"the chosen block also holds text that is not YAML (block at lines "
                     f"{_span(block.lines)}); only lines {_span(block.recipe_lines)} are the recipe")
    if notes:
        log.warning("%s: %s. Recipe audited: %s. To audit another, save it to a file and give "
                    "--recipe FILE", card, "; ".join(notes), choice.source)
    return choice


def recipe_from_card(text: str) -> str | None:
    """The recipe of a card that `choose_recipe` picks, as text; None when it has none."""
    choice = choose_recipe(recipe_blocks(text))
    return choice.document.text if choice is not None else None


def _scalar(token: str) -> Any:
    return yaml.safe_load(token)


def unflatten_recipe(flat: str) -> dict[str, Any] | None:
    """A recipe from YAML whose line breaks were lost (`models: - model: "a" parameters: ...`).

    Top-level keys are mergekit's; within `models`, each `-` starts an entry with `model:` and
    `parameters:` holding `name: value` pairs. Returns None when the text does not fit."""
    tokens = _TOKEN.findall(flat)
    data: dict[str, Any] = {}
    target: dict[str, Any] | None = None  # where `name: value` pairs go
    entry: dict[str, Any] | None = None
    i = 0
    try:
        while i < len(tokens):
            tok = tokens[i]
            if tok == "-":
                entry = {}
                data.setdefault("models", []).append(entry)
                target, i = entry, i + 1
                continue
            if not tok.endswith(":"):
                return None
            key = tok[:-1]
            in_entry_params = entry is not None and key == "parameters" and "parameters" not in entry
            if in_entry_params:
                target = entry["parameters"] = {}
                i += 1
            elif key in TOP_KEYS:
                entry = None
                if key in ("models", "parameters", "slices"):
                    data[key] = [] if key != "parameters" else {}
                    target = data[key] if key == "parameters" else None
                    i += 1
                else:
                    data[key], target, i = _scalar(tokens[i + 1]), None, i + 2
            elif target is not None:
                target[key], i = _scalar(tokens[i + 1]), i + 2
            else:
                return None
    except (IndexError, yaml.YAMLError):
        return None
    return data


def find_recipe(published: Path, recipe_file: str | Path | None = None) -> tuple[str, str]:
    """(recipe text, where it came from): the given file, the published mergekit_config.yml,
    else the recipe of the README card that `choose_recipe` picks (the source names the block)."""
    if recipe_file is not None:
        try:
            return Path(recipe_file).read_text(encoding="utf-8"), str(recipe_file)
        except (OSError, UnicodeDecodeError) as err:
            raise AuditError(f"cannot read recipe {recipe_file}: {getattr(err, 'strerror', None) or err}") from None
    config = published / "mergekit_config.yml"
    if config.is_file():
        return config.read_text(encoding="utf-8"), "mergekit_config.yml"
    card = published / "README.md"
    blocks = recipe_blocks(card.read_text(encoding="utf-8")) if card.is_file() else []
    choice = choose_recipe(blocks)
    if choice is not None:
        return choice.document.text, choice.source
    if blocks:  # recipe blocks, none of them valid: say which and why
        broken = "; ".join(f"block {i} ({b.where()}): {b.error or 'not a mergekit recipe'}"
                           for i, b in enumerate(blocks, 1))
        raise AuditError(
            f"{card}: its recipe is not valid YAML as published ({broken}); copy it into a file, "
            "correct it, and give it with --recipe FILE")
    raise AuditError(
        f"{published}: no recipe found (no mergekit_config.yml, and no YAML recipe block in "
        "README.md); give one with --recipe FILE, or estimate one from the weights with "
        "--infer --candidate MODEL (once per possible parent)"
    )
