"""The table of mergekit releases: every record is usable, an unknown version is never followed
silently, and an audit says whose semantics it followed and whether they were verified."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from remerge.cli import main
from remerge.errors import AuditError, RecipeError
from remerge.merge.methods import METHODS
from remerge.merge.releases import (DEFAULT_VERSION, RELEASES, VERSIONS, counting_duplicates_once,
                                    get_release, release_of_published, verified_for)

ROOT = Path(__file__).resolve().parents[1]
PARITY = Path(__file__).resolve().parent / "parity"


def test_every_record_names_known_methods_and_only_its_own_version():
    for version, release in RELEASES.items():
        assert release.version == version
        assert release.methods <= set(METHODS), version
        assert get_release(version) is release


def test_the_releases_pypi_lacks_are_recorded_unverified():
    unverified = {v for v, r in RELEASES.items() if not r.verified}
    assert unverified == {"0.0.4.4", "0.0.5.2", "0.1.0", "0.1.1", "0.1.2", "0.1.3"}
    assert {"0.0.5", "0.0.5.1", "0.0.6", "0.1.4", "0.1.5"} == set(RELEASES) - unverified


def test_what_the_report_established_is_in_the_records():
    old, new = get_release("0.0.5.1"), get_release("0.1.5")
    assert get_release("0.0.5") == __import__("dataclasses").replace(old, version="0.0.5")
    assert get_release("0.0.6").lm_head_fallback == "embedding" and "sce" not in get_release("0.0.6").methods
    v014 = get_release("0.1.4")
    assert v014.index == new.index and v014.linear_accumulator == old.linear_accumulator
    assert "generation_config.json" not in v014.tokenizer_files and "karcher" not in v014.methods
    assert v014.config_json == "donor_keys_sorted_dtype"
    assert get_release("0.1.2").index.metadata_keys == ("mergekit_version",)  # no total_size
    assert not any("slerp" in get_release(v).methods for v in VERSIONS if v != "0.1.5")  # numpy


def test_get_release_refuses_an_unknown_version():
    with pytest.raises(RecipeError, match="mergekit version `0.9.0` is not supported"):
        get_release("0.9.0")
    assert get_release(None).version == DEFAULT_VERSION


def test_a_recipe_listing_a_model_twice_still_follows_0_0_5_1():
    assert counting_duplicates_once().version == "0.0.5.1"


@pytest.mark.parametrize("recorded, follows", [("0.9.0", "0.1.5"), ("0.1.6", "0.1.5"),
                                               ("0.0.5.3", "0.0.5.2"), ("0.0.3", "0.0.4.4")])
def test_an_unknown_version_number_follows_the_nearest_older_record_with_one_warning(
        recorded, follows, caplog):
    with caplog.at_level(logging.WARNING, logger="remerge.merge.releases"):
        assert release_of_published(recorded).version == follows
    [line] = [r.getMessage() for r in caplog.records]
    assert f"published with mergekit {recorded}, which remerge has no record of" in line
    assert f"following mergekit {follows}'s semantics" in line
    assert not verified_for(RELEASES[follows], recorded)


@pytest.mark.parametrize("recorded", ["banana", "", "0.1.", "v0.1.5", None])
def test_a_string_that_is_no_version_is_refused_in_one_line(recorded):
    with pytest.raises(AuditError) as err:
        release_of_published(recorded)
    assert f"mergekit_version {recorded!r}, which is not a mergekit version" in str(err.value)
    assert "--mergekit-version" in str(err.value) and "\n" not in str(err.value)


def test_a_known_version_gives_its_own_record_silently(caplog):
    for version in VERSIONS:
        assert release_of_published(version) is RELEASES[version]
    assert not caplog.records


def test_the_config_schema_enumerates_every_release():
    schema = yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())
    enums = []

    def walk(node):
        if isinstance(node, dict):
            if "mergekit_version" in node and "enum" in node["mergekit_version"]:
                enums.append(node["mergekit_version"]["enum"])
            for value in node.values():
                walk(value)
    walk(schema)
    assert enums and all(e == [*VERSIONS, None] for e in enums)
    readme = (ROOT / "config" / "README.md").read_text()
    assert all(f"`{v}`" in readme for v in VERSIONS)


def test_the_workflow_config_accepts_every_release_and_names_them_for_another(tmp_path):
    from remerge.workflow.config import ConfigError, check_config

    def config(version):
        return {"models": {"base": {"path": str(PARITY / "models" / "base")},
                           "ft": {"path": str(PARITY / "models" / "ft_a")}},
                "merges": {"m": {"recipe": {"merge_method": "ties", "base_model": "base", "dtype": "bfloat16",
                                            "models": [{"model": "ft", "parameters": {"weight": 1, "density": 0.5}}]},
                                 "mergekit_version": version}}}
    for version in VERSIONS:
        assert check_config(config(version))["m"].mergekit_version == version
    with pytest.raises(ConfigError, match=r"mergekit_version: '0.9.0' \(allowed: 0.0.4.4, "):
        check_config(config("0.9.0"))


def test_the_command_line_accepts_every_release_and_refuses_another(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(PARITY)
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "recipes/ties_d05_two_models.yml", str(tmp_path / "x"), "--mergekit-version", "0.9.0"])
    assert exit_.value.code == 2 and "invalid choice: '0.9.0'" in capsys.readouterr().err
    # an unverified record merges as it says: 0.1.3's tag writes 0.1.2's index, no total_size
    assert main(["merge", "recipes/ties_multishard_2k.yml", str(tmp_path / "y"),
                 "--mergekit-version", "0.1.3", "--out-shard-size", "2K"]) == 0
    text = (tmp_path / "y" / "model.safetensors.index.json").read_text()
    assert text.startswith('{"metadata": {"mergekit_version": "0.1.3"}, "weight_map": {')


# --- audits name the semantics they followed -------------------------------------------------


def published_as(golden: Path, recorded: str, tmp_path: Path) -> Path:
    """A genuine mergekit merge whose index records another `mergekit_version`."""
    pub = tmp_path / golden.name
    shutil.copytree(golden, pub)
    index = pub / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["metadata"]["mergekit_version"] = recorded
    index.write_text(json.dumps(data))
    return pub


def audit(pub: Path, tmp_path: Path) -> tuple[int, dict, str]:
    out = tmp_path / "audit"
    code = main(["audit", str(pub), str(out), "--path-map", f"./models={PARITY / 'models'}"])
    return code, json.loads((out / "audit.json").read_text()), (out / "audit.md").read_text()


def test_a_merge_recorded_as_0_1_4_audits_following_the_verified_record(tmp_path):
    code, report, md = audit(PARITY / "goldens" / "0.1.4" / "ties_multishard_2k", tmp_path)
    assert code == 0 and report["verdict"] == "bit-identical"
    assert report["mergekit_semantics"] == "0.1.4" and report["semantics_verified"] is True
    assert report["version_source"] == "recorded in the published index"
    assert "- followed mergekit 0.1.4 (recorded in the published index)" in md
    assert "- semantics verified: yes" in md


def test_a_merge_recorded_as_0_0_4_4_audits_following_the_unverified_record(tmp_path):
    # 0.0.5.1's bytes, which the 0.0.4.4 record says 0.0.4.4 writes
    pub = published_as(PARITY / "goldens" / "0.0.5.1" / "ties_d05_two_models", "0.0.4.4", tmp_path)
    code, report, md = audit(pub, tmp_path)
    assert code == 0 and report["verdict"] == "bit-identical"
    assert report["mergekit_semantics"] == "0.0.4.4" and report["semantics_verified"] is False
    assert "- followed mergekit 0.0.4.4 (recorded in the published index)" in md
    assert "- semantics verified: **no** (remerge's record of mergekit 0.0.4.4 was read from mergekit's history" in md


def test_a_merge_recorded_with_an_unknown_version_says_which_release_it_followed(tmp_path, caplog):
    pub = published_as(PARITY / "goldens" / "0.1.5" / "ties_multishard_2k", "0.9.0", tmp_path)
    with caplog.at_level(logging.WARNING):
        code, report, md = audit(pub, tmp_path)
    assert code == 0 and report["verdict"] == "bit-identical"
    assert report["mergekit_semantics"] == "0.1.5" and report["semantics_verified"] is False
    assert "records 0.9.0, which remerge has no record of: the nearest release" in report["version_source"]
    assert any("following mergekit 0.1.5's semantics" in r.getMessage() for r in caplog.records)
    assert "- semantics verified: **no** (the merge's own release has no record" in md


def test_a_merge_recorded_with_no_version_number_is_refused_in_one_line(tmp_path, capsys):
    pub = published_as(PARITY / "goldens" / "0.1.5" / "ties_multishard_2k", "banana", tmp_path)
    assert main(["audit", str(pub), str(tmp_path / "audit"), "--path-map", f"./models={PARITY / 'models'}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any("mergekit_version 'banana', which is not a mergekit version" in line for line in err), err
    # the user's choice needs no recorded version
    assert main(["audit", str(pub), str(tmp_path / "audit"), "--path-map", f"./models={PARITY / 'models'}",
                 "--mergekit-version", "0.1.5"]) == 0
