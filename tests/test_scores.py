"""remerge.evaluation.scores and `remerge scores`: hand-computed values for every benchmark."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from remerge import cli
from remerge.evaluation import scores
from remerge.evaluation.scores import card_markdown, card_table, format_percent, leaderboard_table

BBH = {f"leaderboard_bbh_{name}": k for name, k in scores._BBH_CHOICES.items()}
MUSR = (
    "leaderboard_musr_murder_mysteries",
    "leaderboard_musr_object_placements",
    "leaderboard_musr_team_allocation",
)  # 2, 5 and 3 choices


def entry(metric: str, value: float, **more: float) -> dict[str, Any]:
    """One lm-eval results entry, with the clutter real files have (alias, stderr "N/A")."""
    out: dict[str, Any] = {"alias": "x", f"{metric},none": value, f"{metric}_stderr,none": "N/A"}
    out.update({f"{m},none": v for m, v in more.items()})
    return out


def leaderboard_results(
    *,
    ifeval: tuple[float, float] = (0.7, 0.8),
    bbh: dict[str, float] | None = None,
    bbh_group: float | None = 0.9,
    math: float | None = 0.12,
    gpqa: float = 0.3,
    musr: tuple[float, float, float] = (0.6, 0.4, 0.2),
    musr_group: float | None = 0.4,
    mmlu_pro: float = 0.37,
) -> dict[str, Any]:
    """A leaderboard-shaped lm-eval results dict. Defaults: BBH subtasks at 1.0 except
    sports_understanding 0.75 (k=2), date_understanding 0.5 (k=6), object_counting 0.0 (k=19)."""
    if bbh is None:
        bbh = {task: 1.0 for task in BBH}
        bbh.update(
            {
                "leaderboard_bbh_sports_understanding": 0.75,
                "leaderboard_bbh_date_understanding": 0.5,
                "leaderboard_bbh_object_counting": 0.0,
            }
        )
    results: dict[str, Any] = {
        "leaderboard_ifeval": entry(
            "prompt_level_strict_acc",
            ifeval[0],
            inst_level_strict_acc=ifeval[1],
            prompt_level_loose_acc=0.9,
            inst_level_loose_acc=0.95,  # not used by either table
        ),
        "leaderboard_gpqa": entry("acc_norm", gpqa),
        "leaderboard_mmlu_pro": entry("acc", mmlu_pro),
    }
    results.update({task: entry("acc_norm", value) for task, value in bbh.items()})
    results.update({task: entry("acc_norm", value) for task, value in zip(MUSR, musr)})
    groups = {
        "leaderboard_bbh": bbh_group,
        "leaderboard_musr": musr_group,
        "leaderboard_math_hard": math,
    }
    group_entries = {
        name: entry("exact_match" if "math" in name else "acc_norm", value)
        for name, value in groups.items()
        if value is not None
    }
    results.update(group_entries)
    n_shot = {"leaderboard_bbh": 3, "leaderboard_math_hard": 4, "leaderboard_mmlu_pro": 5}
    return {"results": results, "groups": group_entries, "n-shot": n_shot, "n-samples": {}}


# ------------------------------------------------------------------------- benchmark by benchmark


def test_bbh_normalizes_each_subtask_with_its_choices_then_takes_the_plain_mean():
    results = leaderboard_results()
    # 21 subtasks at 100; sports (0.75 - 1/2) / (1/2) = 50; date (0.5 - 1/6) / (5/6) = 40;
    # object_counting 0.0 < 1/19 -> clamped to 0 (unclamped it would be -5.56)
    assert leaderboard_table(results)["BBH"] == pytest.approx((21 * 100 + 50 + 40 + 0) / 24)
    assert leaderboard_table(results)["BBH"] == pytest.approx(91.25)
    # the card shows lm-eval's size-weighted group value, not a recomputation
    assert card_table(results)["BBH"] == pytest.approx(90.0)


def test_musr_normalizes_with_two_five_and_three_choices():
    results = leaderboard_results(musr=(0.6, 0.4, 0.2), musr_group=0.4)
    # (0.6 - 1/2)/(1/2) = 20; (0.4 - 1/5)/(4/5) = 25; (0.2 - 1/3)/(2/3) = -20 -> 0
    assert leaderboard_table(results)["MuSR"] == pytest.approx((20 + 25 + 0) / 3)
    assert card_table(results)["MuSR"] == pytest.approx(40.0)


def test_gpqa_baseline_is_a_quarter():
    results = leaderboard_results(gpqa=0.3)
    assert leaderboard_table(results)["GPQA"] == pytest.approx((0.3 - 0.25) / 0.75 * 100)
    assert card_table(results)["GPQA"] == pytest.approx(30.0)


def test_mmlu_pro_baseline_is_a_tenth():
    results = leaderboard_results(mmlu_pro=0.37)
    assert leaderboard_table(results)["MMLU-PRO"] == pytest.approx(30.0)  # (0.37 - 0.1) / 0.9
    assert card_table(results)["MMLU-PRO"] == pytest.approx(37.0)


def test_ifeval_is_the_mean_of_the_two_strict_metrics_in_both_tables():
    results = leaderboard_results(ifeval=(0.7, 0.8))  # loose metrics 0.9 / 0.95 are ignored
    assert card_table(results)["IFEval"] == pytest.approx(75.0)
    assert leaderboard_table(results)["IFEval"] == pytest.approx(75.0)


def test_math_has_no_baseline():
    results = leaderboard_results(math=0.12)
    assert card_table(results)["MATH Lvl 5"] == pytest.approx(12.0)
    assert leaderboard_table(results)["MATH Lvl 5"] == pytest.approx(12.0)


def test_scores_below_the_random_baseline_clamp_at_zero():
    assert scores.normalize(0.2, 0.25) == 0.0
    assert scores.normalize(0.25, 0.25) == 0.0
    assert scores.normalize(1.0, 0.25) == pytest.approx(100.0)
    results = leaderboard_results(gpqa=0.2, mmlu_pro=0.05)
    assert leaderboard_table(results)["GPQA"] == 0.0
    assert leaderboard_table(results)["MMLU-PRO"] == 0.0
    assert card_table(results)["GPQA"] == pytest.approx(20.0)  # raw scores are never clamped


def test_averages_are_plain_means_of_the_six():
    results = leaderboard_results()
    assert card_table(results)["Average"] == pytest.approx((75 + 90 + 12 + 30 + 40 + 37) / 6)
    normalized = 75 + 91.25 + 12 + (0.05 / 0.75 * 100) + 15 + 30
    assert leaderboard_table(results)["Average"] == pytest.approx(normalized / 6)
    assert list(card_table(results)) == list(scores.TABLE_KEYS)
    assert list(leaderboard_table(results)) == list(scores.TABLE_KEYS)


# ------------------------------------------------------------------------- missing, groups


def test_a_missing_benchmark_is_missing_not_zero_and_so_is_the_average():
    results = leaderboard_results(math=None)
    for table in (card_table(results), leaderboard_table(results)):
        assert table["MATH Lvl 5"] is None
        assert table["Average"] is None
        assert table["IFEval"] == pytest.approx(75.0)  # the others are still there
    assert "|MATH Lvl 5 (4-Shot)|missing|" in card_markdown(card_table(results))


def test_ifeval_with_one_strict_metric_only_is_missing():
    results = leaderboard_results()
    del results["results"]["leaderboard_ifeval"]["inst_level_strict_acc,none"]
    assert card_table(results)["IFEval"] is None


def test_a_partial_bbh_is_not_normalized():
    results = leaderboard_results()
    del results["results"]["leaderboard_bbh_snarks"]
    assert leaderboard_table(results)["BBH"] is None


def test_group_values_are_rebuilt_from_subtasks_weighted_by_size():
    # a run that listed subtasks: no group entries, so weight by evaluated sample counts
    musr_sizes = {
        "leaderboard_musr_murder_mysteries": 250,
        "leaderboard_musr_object_placements": 256,
        "leaderboard_musr_team_allocation": 250,
    }
    results = leaderboard_results(musr=(0.6, 0.4, 0.2), musr_group=None)
    results["n-samples"] = {t: {"original": n, "effective": n} for t, n in musr_sizes.items()}
    expected = (0.6 * 250 + 0.4 * 256 + 0.2 * 250) / 756 * 100
    assert card_table(results)["MuSR"] == pytest.approx(expected)


def test_math_exact_match_original_comes_from_the_subtasks():
    bench = scores.BENCHMARK_BY_NAME["MATH Lvl 5"]
    results = leaderboard_results(math=0.3)  # the group reports only exact_match
    for i, task in enumerate(bench.subtasks):  # sizes 100, 200, ..., 700
        results["results"][task] = entry("exact_match", 0.3, exact_match_original=0.1 * (i % 2))
        results["n-samples"][task] = {"original": 100 * (i + 1), "effective": 100 * (i + 1)}
    # odd subtasks (sizes 200, 400, 600) at 0.1, even ones (100, 300, 500, 700) at 0
    expected = 0.1 * (200 + 400 + 600) / sum(100 * (i + 1) for i in range(7)) * 100
    assert card_table(results, "exact_match_original")["MATH Lvl 5"] == pytest.approx(expected)
    assert card_table(results)["MATH Lvl 5"] == pytest.approx(30.0)


def test_groups_only_under_groups_are_found():
    # lm-eval before 0.4.3 put group entries under "groups" alone
    results = leaderboard_results()
    del results["results"]["leaderboard_bbh"]
    assert card_table(results)["BBH"] == pytest.approx(90.0)


def test_no_leaderboard_task_means_all_missing():
    results = {"results": {"demo_skill": entry("acc", 0.5)}}
    assert not scores.has_leaderboard_tasks(results)
    assert set(card_table(results).values()) == {None}
    document = scores.scores_document(results)
    assert document["card"] is None and document["leaderboard"] is None
    assert document["tasks"] == {"demo_skill": {"acc": 0.5}}


# ------------------------------------------------------------------------- the seed's card


SEED_CARD = """\
|      Metric       |Value|
|-------------------|----:|
|Average Score      |43.07|
|IFEval (0-Shot)    |80.96|
|BBH (3-Shot)       |51.10|
|MATH Lvl 5 (4-Shot)|15.56|
|GPQA (0-shot)      |30.96|
|MuSR (0-shot)      |41.01|
|MMLU-PRO (5-shot)  |38.80|
"""


def seed_results() -> dict[str, Any]:
    """A results file that would give the seed card's numbers."""
    return leaderboard_results(
        ifeval=(0.7726, 0.8466),  # mean 0.8096
        bbh={task: 0.5110 for task in BBH},
        bbh_group=0.5110,
        math=0.1556,
        gpqa=0.3096,
        musr=(0.4101, 0.4101, 0.4101),
        musr_group=0.4101,
        mmlu_pro=0.3880,
    )


def test_the_seed_cards_table_is_reproduced():
    table = card_table(seed_results())
    assert card_markdown(table) == SEED_CARD  # 258.39 / 6 = 43.065 -> 43.07, half up
    normalized = leaderboard_table(seed_results())
    assert format_percent(normalized["GPQA"]) == "7.95"  # (0.3096 - 0.25) / 0.75
    assert format_percent(normalized["MMLU-PRO"]) == "32.00"  # (0.388 - 0.1) / 0.9


def test_format_percent_rounds_half_up_and_says_missing():
    assert format_percent(258.39 / 6) == "43.07"
    assert format_percent(51.1) == "51.10"
    assert format_percent(0.004999) == "0.00"
    assert format_percent(None) == "missing"


def test_card_labels_take_the_shot_counts_that_ran():
    results = seed_results()
    results["n-shot"]["leaderboard_bbh"] = 0  # as older lm-eval wrote groups
    assert scores.benchmark_shots(results)["BBH"] == 0  # no subtask counts: the group's
    results["n-shot"].update({task: 3 for task in BBH})
    assert scores.benchmark_shots(results)["BBH"] == 3  # subtasks win
    results["n-shot"]["leaderboard_mmlu_pro"] = 1
    shots = scores.benchmark_shots(results)
    assert "|MMLU-PRO (1-shot)" in card_markdown(card_table(results), shots)
    assert shots["GPQA"] == 0  # not in n-shot: the leaderboard's count


def test_bbh_choice_counts_match_the_installed_lm_eval_task_files():
    # read the YAMLs as data (no lm-eval import): doc_to_choice lists the options
    spec = importlib.util.find_spec("lm_eval")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "tasks/leaderboard/bbh_mc"

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    found = {}
    for path in folder.glob("*.yaml"):
        config = yaml.load(path.read_text(), Loader=Loader)
        if isinstance(config, dict) and "doc_to_choice" in config:
            found[config["task"]] = len(config["doc_to_choice"])
    assert found == BBH


# ------------------------------------------------------------------------- task_scores


def test_task_scores_keeps_main_metrics_only():
    results = {
        "results": {
            "demo_a": {
                "alias": "demo_a",
                "sample_len": 20,
                "acc,none": 0.6,
                "acc_stderr,none": "N/A",
                "acc_norm,none": 0.55,
                "acc_norm_stderr,none": 0.1,
            },
            "demo_gen": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05},
            "demo_group": {"acc,none": 0.5, "sample_count": {"acc,none": 40}},
        }
    }
    assert scores.task_scores(results) == {
        "demo_a": {"acc": 0.6, "acc_norm": 0.55},
        "demo_gen": {"exact_match,strict-match": 0.25},
        "demo_group": {"acc": 0.5},
    }


# ------------------------------------------------------------------------- the command


@pytest.fixture
def seed_file(tmp_path: Path) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(seed_results()))
    return path


def test_cli_json_prints_both_tables_in_percent(seed_file: Path, capsys):
    assert cli.main(["scores", str(seed_file), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"card", "leaderboard"}
    keys = ["IFEval", "BBH", "MATH Lvl 5", "GPQA", "MuSR", "MMLU-PRO", "Average"]
    assert list(printed["card"]) == keys and list(printed["leaderboard"]) == keys
    assert printed["card"]["IFEval"] == pytest.approx(80.96)
    assert printed["card"]["Average"] == pytest.approx(43.065)
    assert printed["leaderboard"]["GPQA"] == pytest.approx(7.9466667)


def test_cli_json_reports_missing_as_null(tmp_path: Path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(leaderboard_results(math=None)))
    assert cli.main(["scores", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["card"]["MATH Lvl 5"] is None and printed["card"]["Average"] is None
    assert printed["leaderboard"]["MATH Lvl 5"] is None


def test_cli_text_names_raw_and_normalized(seed_file: Path, capsys):
    assert cli.main(["scores", str(seed_file)]) == 0
    out = capsys.readouterr().out
    assert "raw scores x 100" in out and "normalized" in out
    assert SEED_CARD in out
    assert "|GPQA (0-shot)      | 7.95|" in out


def test_cli_out_writes_the_scores_document(seed_file: Path, tmp_path: Path):
    out = tmp_path / "point" / "scores.json"
    assert cli.main(["scores", str(seed_file), "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["format"] == "remerge.scores/1"
    assert document["card"]["MMLU-PRO"] == pytest.approx(38.8)
    assert document["tasks"]["leaderboard_gpqa"] == {"acc_norm": 0.3096}


def test_cli_unreadable_results_file_names_it(tmp_path: Path, capsys):
    path = tmp_path / "results.json"
    path.write_text("{truncated")
    assert cli.main(["scores", str(path)]) == 2
    assert str(path) in capsys.readouterr().err
