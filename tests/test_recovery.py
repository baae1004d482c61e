"""Recipes recovered from model cards as people publish them.

The real corpus (../shared/real-recipes, next to the repository: other people's public text,
never copied into the project) is checked card by card; the unit tests below hold one small
card of each hard shape.

Comparison rule: a recovered block matches a corpus recipe file when the two texts are equal
after dropping the blank lines around them (line by line otherwise exact, trailing spaces
included). The corpus's files are the published blocks verbatim, so a block's text as
published (`RecipeBlock.text`) is compared; a file taken from the repository's
`mergekit_config.yml` (the corpus's index.tsv says so) holds only the YAML, so it is compared
with the block's YAML part (`RecipeBlock.recipe`)."""

import csv
import logging
import tempfile
from pathlib import Path

import pytest

from remerge.errors import AuditError
from remerge.provenance.recovery import choose_recipe, find_recipe, recipe_blocks, recipe_from_card

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "real-recipes"
SEED_CARD = Path(__file__).resolve().parent / "data" / "seed-model-card.txt"


def trimmed(text: str) -> str:
    """The comparison rule: the text less the blank lines around it."""
    lines = text.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def card_rows() -> list:
    index = CORPUS / "cards" / "index.tsv"
    if not index.is_file():
        return [pytest.param(None, id="corpus-absent")]
    with index.open(encoding="utf-8") as f:
        return [pytest.param(row, id=row["file"]) for row in csv.DictReader(f, delimiter="\t")]


def recipe_sources() -> dict[str, str]:
    with (CORPUS / "index.tsv").open(encoding="utf-8") as f:
        return {row["file"].removesuffix(".yaml"): row["source"] for row in csv.DictReader(f, delimiter="\t")}


@pytest.mark.parametrize("row", card_rows())
def test_real_card_yields_exactly_its_listed_recipes(row, tmp_path):
    if row is None:
        pytest.skip(f"{CORPUS} is absent (a development corpus beside the repository, not shipped)")
    text = (CORPUS / "cards" / row["file"]).read_text(encoding="utf-8")
    listed = [] if row["recipes_in_corpus"].strip() == "-" else row["recipes_in_corpus"].split(",")
    blocks = recipe_blocks(text)
    assert len(blocks) == len(listed), [b.where() for b in blocks]

    # find_recipe on the card as a published folder: the last usable recipe, else a named error
    (tmp_path / "README.md").write_text(text, encoding="utf-8")
    usable = [d for b in blocks for d in b.documents if d.is_recipe]
    if usable:
        assert find_recipe(tmp_path)[0] == usable[-1].text
    else:
        with pytest.raises(AuditError, match="--recipe FILE"):
            find_recipe(tmp_path)

    sources = recipe_sources()
    missing = [n for n in listed if not (CORPUS / "recipes" / f"{n}.yaml").is_file()]
    for name, block in zip(listed, blocks):
        if name in missing:
            continue
        want = (CORPUS / "recipes" / f"{name}.yaml").read_text(encoding="utf-8")
        got = block.recipe if "mergekit_config.yml" in sources.get(name, "") else block.text
        assert trimmed(got) == trimmed(want), f"{row['file']}: {block.where()} is not recipes/{name}.yaml"
    if missing:
        pytest.skip(f"{row['file']}: blocks counted, text not compared: "
                    f"{', '.join(f'recipes/{n}.yaml' for n in missing)} not in the corpus")


# --- one small card per hard shape -------------------------------------------------------------

RECIPE = """models:
  - model: org/a
    parameters:
      weight: 0.5
  - model: org/b
    parameters:
      weight: 0.5
merge_method: linear
dtype: bfloat16
"""


def lines_of(card: str, snippet: str) -> tuple[int, int]:
    """The card lines (1-based) of a snippet that starts a line of the card."""
    first = card[:card.index(snippet)].count("\n") + 1
    return first, first + snippet.rstrip("\n").count("\n")


def find_recipe_in(card: str) -> tuple[str, str]:
    """find_recipe on a published folder holding just this card."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "README.md").write_text(card, encoding="utf-8")
        return find_recipe(Path(folder))


def test_frontmatter_is_never_a_recipe():
    front = "---\nlicense: other\n" + RECIPE + "---\n"
    assert recipe_blocks(front + "# A merge\n\nNo recipe here.\n") == []
    card = front + "# A merge\n\n```yaml\n" + RECIPE + "```\n"
    [block] = recipe_blocks(card)
    assert block.kind == "fenced" and block.lines == (16, 24)  # after the frontmatter's lines 1-12


def test_unlabelled_fence():
    card = "# x\n\nThe recipe:\n```\n" + RECIPE + "```\n\n```\nUSER: {prompt}\nASSISTANT:\n```\n"
    [block] = recipe_blocks(card)
    assert block.label == "" and block.fence == 1 and block.parses and block.is_recipe
    assert block.text == RECIPE and block.lines == (5, 13)


def test_fence_of_another_language_is_code_not_a_recipe():
    card = "```python\nconfig = '''\n" + RECIPE + "'''\n```\n"
    assert recipe_blocks(card) == []


def test_fence_inside_details():
    card = ("# x\n\n<details><summary>Recipe</summary>\n\n```yaml\n" + RECIPE + "```\n\n</details>\n\n"
            "Another:\n\n```yaml\n" + RECIPE.replace("org/b", "org/c") + "```\n")
    inside, after = recipe_blocks(card)
    assert inside.in_details and not after.in_details
    assert inside.where() == "inside <details>, lines 6-14"


def test_unfenced_card_body():
    card = "---\nlicense: apache-2.0\n---\n\n" + RECIPE + "\n\nBenchmarks are coming soon.\n"
    [block] = recipe_blocks(card)
    assert block.kind == "unfenced" and block.text == RECIPE and block.lines == (5, 13)
    assert recipe_from_card(card) == RECIPE
    choice = choose_recipe([block])
    assert choice.source == "README.md, block 1 of 1 (unfenced, lines 5-13)"


def test_pseudo_yaml_in_prose_is_not_a_recipe():
    card = ("## Recipe\nmerge_method: dare_ties\n\n  - base_model: org/base\n\n  - model: org/a\n\n"
            "      weight: 0.41 / density: 0.50\n\nint8_mask: true\n\ndtype: bfloat16\n\n## Thanks\n")
    assert recipe_blocks(card) == []
    with pytest.raises(AuditError, match="no recipe found"):
        find_recipe_in(card)


def test_unfenced_recipe_without_its_wrappers_is_returned_as_not_parsing():
    body = ("      - model: org/a\n        layer_range: [0, 8]\n\n      - model: org/b\n"
            "        layer_range: [4, 12]\nmerge_method: passthrough\n")
    card = "Merge with the following conditions\n\n\n" + body + "\n\n\nBenchmarks soon...\n"
    [block] = recipe_blocks(card)
    assert block.kind == "unfenced" and block.text == body and not block.parses
    with pytest.raises(AuditError, match=r"block 1 \(unfenced, lines 4-9\).*--recipe FILE"):
        find_recipe_in(card)


STAGE_1 = "slices:\n  - sources:\n    - model: org/a\n      layer_range: [0, 24]\nmerge_method: passthrough\n"
STAGE_2 = "slices:\n  - sources:\n    - model: org/b\n      layer_range: [0, 24]\nmerge_method: passthrough\n"
STAGE_3 = ("slices:\n  - sources:\n      - model: ./stage-1\n        layer_range: [0, 48]\n"
           "      - model: ./stage-2\n        layer_range: [0, 48]\nmerge_method: slerp\n"
           "base_model: ./stage-1\nparameters:\n  t: 0.5\ndtype: bfloat16\n")


def test_several_fences_the_last_stage_is_chosen_and_named(caplog, tmp_path):
    card = ("# x\n\nstage-1 :\n```\n" + STAGE_1 + "```\n\nstage-2 :\n```\n" + STAGE_2
            + "```\n\nfinal :\n```\n" + STAGE_3 + "```\n")
    blocks = recipe_blocks(card)
    assert [b.text for b in blocks] == [STAGE_1, STAGE_2, STAGE_3]
    first, last = lines_of(card, STAGE_3)
    with caplog.at_level(logging.WARNING, logger="remerge.provenance.recovery"):
        text, source = find_recipe_in(card)
    assert text == STAGE_3 and source == f"README.md, block 3 of 3 (lines {first}-{last})"
    assert "3 recipes" in caplog.text and "auditing the last" in caplog.text and "--recipe FILE" in caplog.text
    # --recipe wins over the card
    (tmp_path / "README.md").write_text(card)
    (tmp_path / "stage1.yml").write_text(STAGE_1)
    assert find_recipe(tmp_path, tmp_path / "stage1.yml") == (STAGE_1, str(tmp_path / "stage1.yml"))


def test_one_clean_block_keeps_the_plain_source_and_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="remerge.provenance.recovery"):
        assert find_recipe_in("# x\n\n```yaml\n" + RECIPE + "```\n") == (RECIPE, "README.md")
    assert caplog.text == ""


def test_the_same_recipe_twice_is_no_choice(caplog):
    card = "```yaml\n" + RECIPE + "```\n\nAgain, as mergekit wrote it:\n\n```yaml\n" + RECIPE + "```\n"
    with caplog.at_level(logging.WARNING, logger="remerge.provenance.recovery"):
        text, source = find_recipe_in(card)
    assert text == RECIPE and source == "README.md, block 2 of 2 (lines 16-24)"
    assert caplog.text == ""


def test_fence_mixing_a_command_and_notation_with_yaml(caplog):
    command = ("!mergekit-layershuffle ./out \\\n  --model org/a --weight 0.3 \\\n"
               "  --model org/b --weight 0.7 \\\n  --write-yaml out.yaml\n\n=========================\n\n")
    yaml_part = ("merge_method: passthrough\nslices:\n- sources:\n  - layer_range:\n    - 0\n    - 1\n"
                 "    model: org/a\n- sources:\n  - layer_range:\n    - 1\n    - 2\n    model: org/b\n")
    tail = "\n=========================\n\n=> Applying org/lora x 0.35\n"
    card = "## The sauce\n```\n" + command + yaml_part + tail + "```\n"
    [block] = recipe_blocks(card)
    assert block.text == command + yaml_part + tail  # as published
    assert block.recipe == yaml_part and block.parses and block.extra_text
    first, last = lines_of(card, yaml_part)
    with caplog.at_level(logging.WARNING, logger="remerge.provenance.recovery"):
        text, source = find_recipe_in(card)
    assert text == yaml_part
    assert source == f"README.md, block 1 of 1 (lines {first}-{last} of the block at lines 3-{card.count(chr(10)) - 1})"
    assert "not YAML" in caplog.text


def test_lora_notation_before_the_yaml():
    notation = "openchat/openchat_3.5\norg/lora (LoRA) x 0.38\n\n"
    [block] = recipe_blocks("```\n" + notation + RECIPE + "```\n")
    assert block.text == notation + RECIPE and block.recipe == RECIPE and block.is_recipe


def test_malformed_block_is_flagged_and_a_later_stage_still_chosen(caplog):
    bad = ("merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n- model: org/base\n"
           "- model: org/a\n    parameters:\n    weight: 1.0\ndtype: float16\n")
    card = "```yaml\n" + bad + "```\nthen:\n```yaml\n" + RECIPE + "```\n"
    broken, good = recipe_blocks(card)
    assert broken.text == bad and not broken.parses and not broken.is_recipe
    assert "card line 7" in broken.error  # the over-indented `parameters:`
    with caplog.at_level(logging.WARNING, logger="remerge.provenance.recovery"):
        text, source = find_recipe_in(card)
    assert text == RECIPE and source.startswith("README.md, block 2 of 2")
    assert "block 1 (lines 2-9) is not valid YAML" in caplog.text
    with pytest.raises(AuditError, match=r"not valid YAML as published \(block 1 \(lines 2-9\): .*card line 7"):
        find_recipe_in("```yaml\n" + bad + "```\n")


def test_two_configs_in_one_fence_without_a_separator():
    first = ("models: # org/intermediate\n  - model: org/base\n  - model: org/a\n    parameters:\n"
             "      weight: 1\n      density: 0.3\nmerge_method: dare_ties\nbase_model: org/base\ndtype: bfloat16\n")
    second = ("merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: org/intermediate\n"
              "  - model: org/b\nparameters:\n  weight: 1.0\ndtype: bfloat16\n")
    card = "```\n" + first + "\n" + second + "```\n"
    [block] = recipe_blocks(card)
    assert block.text == first + "\n" + second and block.split_key == "merge_method"
    assert [d.text for d in block.documents] == [first, second]
    assert [d.data["merge_method"] for d in block.documents] == ["dare_ties", "task_arithmetic"]
    text, source = find_recipe_in(card)
    assert text == second and source == "README.md, block 1 of 1 (lines 2-19), document 2 of 2 (lines 12-19)"


def test_two_configs_split_where_the_second_begins():
    first = "models:\n  - model: org/a\n\n  - model: org/b\nmerge_method: linear\n"  # a blank inside a list
    second = "base_model: org/base\nmodels:\n  - model: org/c\nmerge_method: task_arithmetic\n"
    [block] = recipe_blocks("```\n" + first + "\n" + second + "```\n")
    assert [d.text for d in block.documents] == [first, second] and block.split_key == "models"


def test_multi_document_block():
    first = RECIPE + "name: intermediate\n"
    second = RECIPE.replace("org/b", "intermediate")
    [block] = recipe_blocks("```yaml\n" + first + "---\n" + second + "```\n")
    assert [d.text for d in block.documents] == [first, second] and block.split_key is None
    assert recipe_from_card("```yaml\n" + first + "---\n" + second + "```\n") == second


def test_block_starting_with_a_blank_line():
    card = "```yaml\n\n" + RECIPE + "\n```\n"
    [block] = recipe_blocks(card)
    assert block.text == "\n" + RECIPE + "\n" and block.recipe == RECIPE and block.recipe_lines == (3, 11)
    assert find_recipe_in(card) == (RECIPE, "README.md")  # blank lines around it are nothing extra


def test_fence_that_runs_on_into_the_next_section():
    card = "```yaml\n" + RECIPE + "\n## Licence\nApache 2.0, see the LICENSE file.\n\n```\n"
    [block] = recipe_blocks(card)
    assert block.recipe == RECIPE and block.extra_text


def test_inline_triple_backticks_and_indented_fences():
    card = ("- examples:\n    - ```\\n### Instruction:\\n```\n```##```\n"
            "1. The recipe:\n   ```yaml\n" + "".join("   " + x + "\n" for x in RECIPE.splitlines()) + "   ```\n")
    [block] = recipe_blocks(card)
    assert block.text == RECIPE and block.fence == 1


def test_unclosed_fence_runs_to_the_end():
    [block] = recipe_blocks("# x\n```yaml\n" + RECIPE)
    assert block.recipe == RECIPE


def test_seed_card_without_line_breaks_is_rebuilt():
    [block] = recipe_blocks(SEED_CARD.read_text())
    assert block.kind == "flattened" and block.is_recipe
    assert block.documents[0].data["merge_method"] == "ties"
