"""Multi-stage recipes (mergekit-multi's format): parity with mergekit-multi 0.1.5, run order,
reuse of intermediates, and one clear line for every bad chain."""

from pathlib import Path

import pytest

from remerge.cli import main
from remerge.errors import RecipeError
from remerge.merge.multi import is_multi_stage, split_stages

PARITY = Path(__file__).resolve().parent / "parity"
GOLDENS = PARITY / "goldens" / "0.1.5"
MULTI = sorted(p.name for p in GOLDENS.glob("multi_*"))


@pytest.fixture()
def work(tmp_path, monkeypatch):
    """A working directory like make_multi_goldens.py's: only `models` (the parity models)."""
    (tmp_path / "models").symlink_to(PARITY / "models")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def merge(recipe: Path, out: str, *extra: str) -> int:
    return main(["merge", str(recipe), out, "-I", "./stages", *extra])


def test_there_are_multi_stage_goldens():
    assert {"multi_two_stage", "multi_three_named"} <= set(MULTI)
    assert all((PARITY / "recipes" / f"{name}.yml").is_file() for name in MULTI)


@pytest.mark.parametrize("recipe", MULTI)
def test_every_stage_equals_mergekit_multi(work, recipe):
    """Every stage's folder, byte for byte: tensors, config.json, tokenizer files, and the
    normalized mergekit_config.yml; the cards but for the order of the set-ordered bullets."""
    golden = GOLDENS / recipe
    # the final stage: --out-path <recipe>, or (every stage named) ./stages/<last document's name>
    final = recipe if (golden / recipe).is_dir() else f"stages/{split_stages((PARITY / 'recipes' / f'{recipe}.yml').read_text(), './stages')[-1].name}"
    assert merge(PARITY / "recipes" / f"{recipe}.yml", final) == 0
    theirs = sorted(p.relative_to(golden) for p in golden.rglob("*") if p.is_file())
    ours = sorted(p.relative_to(work) for p in work.rglob("*") if p.is_file() and "models" not in p.parts)
    assert ours == theirs
    for rel in theirs:
        mine, gold = (work / rel).read_bytes(), (golden / rel).read_bytes()
        if rel.name == "README.md":
            assert sorted(mine.splitlines()) == sorted(gold.splitlines()), rel
        else:
            assert mine == gold, f"{rel} differs"


def test_an_unchanged_intermediate_is_kept_and_a_changed_one_remerged(work):
    recipe = work / "multi.yml"
    text = (PARITY / "recipes" / "multi_two_stage.yml").read_text()
    recipe.write_text(text)
    assert merge(recipe, "out") == 0
    stage = work / "stages" / "ties_stage" / "model.safetensors"
    first, final = stage.stat().st_mtime_ns, (work / "out" / "model.safetensors").read_bytes()

    recipe.write_text(text.replace("t: [0.2, 0.5, 0.8]", "t: 0.5"))  # only the final stage changes
    assert merge(recipe, "out") == 0
    assert stage.stat().st_mtime_ns == first
    assert (work / "out" / "model.safetensors").read_bytes() != final

    recipe.write_text(text.replace("density: 0.5", "density: 0.6"))  # the first stage changes
    assert merge(recipe, "out") == 0
    assert stage.stat().st_mtime_ns != first
    assert merge(recipe, "out", "--no-lazy") == 0


def test_the_default_intermediate_dir_is_next_to_the_output(work):
    assert main(["merge", str(PARITY / "recipes" / "multi_two_stage.yml"), "final"]) == 0
    assert (work / "final.stages" / "ties_stage" / "model.safetensors").is_file()
    assert "model: final.stages/ties_stage" in (work / "final" / "mergekit_config.yml").read_text()


STAGE = "name: {name}\nmodels:\n  - model: {model}\nmerge_method: passthrough\n"
FINAL = "models:\n  - model: {model}\nmerge_method: passthrough\n"


def chain(*docs: str) -> str:
    return "---\n".join(docs)


def names(text: str) -> list:
    return [s.name for s in split_stages(text, "./stages")]


def test_stages_run_after_what_they_read_by_name_or_by_path():
    text = chain(FINAL.format(model="b"), STAGE.format(name="b", model="./stages/a"),
                 STAGE.format(name="a", model="./models/base"))
    assert names(text) == ["a", "b", None]
    final = split_stages(text, "./stages")[-1]
    assert final.final and final.data["models"][0]["model"] == "./stages/b"
    revision = chain(STAGE.format(name="a", model="./models/base"), FINAL.format(model="a@main"))
    assert split_stages(revision, "./stages")[-1].data["models"][0]["model"] == "./stages/a@main"


def test_every_stage_named_the_final_is_the_one_nobody_reads():
    text = chain(STAGE.format(name="a", model="./models/base"), STAGE.format(name="z", model="a"))
    stages = split_stages(text, "I")
    assert [s.name for s in stages] == ["a", "z"] and stages[-1].final
    assert stages[-1].data["models"][0]["model"] == "I/a"


@pytest.mark.parametrize("text, message", [
    (chain(STAGE.format(name="a", model="b"), STAGE.format(name="b", model="a"), FINAL.format(model="a")),
     "stage `a`: the stages read each other in a cycle: a -> b -> a"),
    (chain(STAGE.format(name="a", model="a"), FINAL.format(model="a")),
     "stage `a`: the stages read each other in a cycle: a -> a"),
    (chain(STAGE.format(name="a", model="./models/base"), FINAL.format(model="ab")),
     "the final stage (document 2): model `ab` is no stage of this file (stages: a), no folder"),
    (chain(STAGE.format(name="a", model="./models/base"), FINAL.format(model="./stages/b")),
     "the final stage (document 2): model `./stages/b` is a folder of the intermediate directory"),
    (chain(STAGE.format(name="a", model="./models/base"), STAGE.format(name="a", model="./models/ft_a"),
           FINAL.format(model="a")), "documents 1 and 2 are both named `a`"),
    (chain(FINAL.format(model="./models/base"), FINAL.format(model="./models/ft_a")),
     "documents 1 and 2 both have no `name:`"),
    (chain(STAGE.format(name="a", model="./models/base"), STAGE.format(name="b", model="./models/ft_a")),
     "every stage has a `name:` and 2 of them are read by no other (a, b)"),
    (chain(STAGE.format(name="passthrough", model="./models/base"), FINAL.format(model="passthrough")),
     "stage `passthrough`: `merge_method: passthrough` names stage `passthrough`; mergekit-multi "
     "replaces every such value"),
    (chain(STAGE.format(name="a", model="./models/base"), ""), "document 2 of the multi-stage file is empty"),
    (chain(STAGE.format(name="a/b", model="./models/base"), FINAL.format(model="x/y")), "must be a folder name"),
])
def test_bad_chains_are_refused_naming_the_stage(text, message):
    with pytest.raises(RecipeError) as err:
        split_stages(text, "./stages")
    assert message in str(err.value)


def test_a_bad_chain_is_one_line_and_writes_nothing(work, capsys):
    recipe = work / "bad.yml"
    recipe.write_text(chain(STAGE.format(name="a", model="./models/base"), FINAL.format(model="b")))
    assert merge(recipe, "out") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"remerge merge: error: {recipe}: the final stage (document 2): model `b` is no stage "
                   "of this file (stages: a), no folder, and no hub id (org/name)")
    assert not (work / "out").exists() and not (work / "stages").exists()


def test_a_bad_later_stage_is_refused_before_the_first_merges(work, capsys):
    recipe = work / "bad.yml"
    recipe.write_text(chain(STAGE.format(name="a", model="./models/base"),
                            FINAL.format(model="a").replace("passthrough", "tie")))
    assert merge(recipe, "out") == 2
    assert "the final stage (document 2): " in capsys.readouterr().err
    assert not (work / "stages").exists()


def test_one_document_is_a_plain_recipe():
    plain = (PARITY / "recipes" / "ties_d05_two_models.yml").read_text()
    assert not is_multi_stage(plain) and not is_multi_stage("---\n" + plain)
    assert not is_multi_stage("name: x\n" + plain)  # `name` alone: an unknown key, as mergekit-yaml
    assert is_multi_stage(chain(plain, plain))
