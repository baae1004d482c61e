"""lm-eval results -> the card table (raw x 100) and the Open LLM Leaderboard table (normalized).

Pure functions over the dict that `lm_eval.simple_evaluate` returns (or its JSON file); no
torch, no lm-eval import, so `remerge scores` starts instantly.

Two tables, never mixed up (facts in ../shared/reference/leaderboard-scoring.md):

- **card**: raw scores x 100 and their plain mean, as on the seed's model card (IFEval 80.96,
  BBH 51.10, ... Average 43.07). BBH, MATH Lvl 5, GPQA and MuSR are lm-eval's group values,
  which are weighted by subtask size.
- **leaderboard**: the leaderboard's normalized scores: each subtask's score rescaled so that
  its random baseline (1 / number of choices) is 0 and a perfect score is 100, clamped at 0,
  then the plain (unweighted) mean of the subtasks; Average = mean of the six.

IFEval is the mean of `prompt_level_strict_acc` and `inst_level_strict_acc` in both tables:
the leaderboard's definition (its cards label the value "inst_level_strict_acc and
prompt_level_strict_acc"; IFEval has no random baseline, so normalizing changes nothing). The
seed's card names no metric and its results file could not be read here; the mean is the
reading that fits: by its recipe the seed merge is the instruct model itself (one model,
weight 1, density 1), whose leaderboard IFEval is about 80 (recalled, not re-checked), while
one model's two strict metrics lie several points apart (prompt-level below, inst-level above).

A benchmark whose metrics are not in the results is *missing* (`None`), never 0. Average is
then missing too: a mean over fewer than six benchmarks is not comparable with any published
Average, and in a grid it would rank points by which benchmarks happened to run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from remerge.errors import EvaluationError

CARD_ROWS = ("IFEval", "BBH", "MATH Lvl 5", "GPQA", "MuSR", "MMLU-PRO")
AVERAGE = "Average"
TABLE_KEYS = (*CARD_ROWS, AVERAGE)
MISSING = "missing"

IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc")
# lm-eval >= 0.4.9: `exact_match` is the Math-Verify score (the leaderboard since 2025-02-14),
# `exact_match_original` the older parser's (the seed's 2024 card). Older lm-eval had only the
# older parser, under `exact_match`.
MATH_METRICS = ("exact_match", "exact_match_original")


@dataclass(frozen=True)
class Benchmark:
    """One row of the tables: the lm-eval task or group and how to score it."""

    name: str  # card row name
    task: str  # lm-eval task or group name (what to pass to --tasks)
    metric: str  # lm-eval metric, filter "none"
    shots: int  # the leaderboard's few-shot count, for the card's row label
    baseline: float = 0.0  # random baseline of a task without subtasks
    # subtask -> number of choices; set: normalize each subtask, then unweighted mean
    choices: Mapping[str, int] | None = None
    # the group's subtasks, to rebuild a size-weighted group value lm-eval did not report
    members: tuple[str, ...] = ()

    @property
    def subtasks(self) -> tuple[str, ...]:
        return tuple(self.choices) if self.choices else self.members


_BBH_CHOICES = {
    "boolean_expressions": 2,
    "causal_judgement": 2,
    "date_understanding": 6,
    "disambiguation_qa": 3,
    "formal_fallacies": 2,
    "geometric_shapes": 11,
    "hyperbaton": 2,
    "logical_deduction_five_objects": 5,
    "logical_deduction_seven_objects": 7,
    "logical_deduction_three_objects": 3,
    "movie_recommendation": 6,
    "navigate": 2,
    "object_counting": 19,
    "penguins_in_a_table": 5,
    "reasoning_about_colored_objects": 18,
    "ruin_names": 6,
    "salient_translation_error_detection": 6,
    "snarks": 2,
    "sports_understanding": 2,
    "temporal_sequences": 4,
    "tracking_shuffled_objects_five_objects": 5,
    "tracking_shuffled_objects_seven_objects": 7,
    "tracking_shuffled_objects_three_objects": 3,
    "web_of_lies": 2,
}
_MUSR_CHOICES = {"murder_mysteries": 2, "object_placements": 5, "team_allocation": 3}
_MATH_SUBTASKS = (
    "algebra",
    "counting_and_prob",
    "geometry",
    "intermediate_algebra",
    "num_theory",
    "prealgebra",
    "precalculus",
)

BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("IFEval", "leaderboard_ifeval", "prompt_level_strict_acc", shots=0),
    Benchmark(
        "BBH",
        "leaderboard_bbh",
        "acc_norm",
        shots=3,
        choices={f"leaderboard_bbh_{k}": v for k, v in _BBH_CHOICES.items()},
    ),
    Benchmark(
        "MATH Lvl 5",
        "leaderboard_math_hard",
        "exact_match",
        shots=4,
        members=tuple(f"leaderboard_math_{s}_hard" for s in _MATH_SUBTASKS),
    ),
    Benchmark(
        "GPQA",
        "leaderboard_gpqa",
        "acc_norm",
        shots=0,
        baseline=0.25,
        members=tuple(f"leaderboard_gpqa_{s}" for s in ("diamond", "extended", "main")),
    ),
    Benchmark(
        "MuSR",
        "leaderboard_musr",
        "acc_norm",
        shots=0,
        choices={f"leaderboard_musr_{k}": v for k, v in _MUSR_CHOICES.items()},
    ),
    # always 10 options in the leaderboard's normalization, whatever each question has
    Benchmark("MMLU-PRO", "leaderboard_mmlu_pro", "acc", shots=5, baseline=0.1),
)
BENCHMARK_BY_NAME = {b.name: b for b in BENCHMARKS}
LEADERBOARD_TASKS = tuple(b.task for b in BENCHMARKS)

# The seed card's row labels; the odd capitalisation ("0-Shot" / "0-shot") is the card's.
_CARD_LABELS = {
    AVERAGE: "Average Score",
    "IFEval": "IFEval ({n}-Shot)",
    "BBH": "BBH ({n}-Shot)",
    "MATH Lvl 5": "MATH Lvl 5 ({n}-Shot)",
    "GPQA": "GPQA ({n}-shot)",
    "MuSR": "MuSR ({n}-shot)",
    "MMLU-PRO": "MMLU-PRO ({n}-shot)",
}
LEADERBOARD_SHOTS = {b.name: b.shots for b in BENCHMARKS}


def card_label(key: str, shots: int | None = None) -> str:
    """A row's label as the seed's card (and the leaderboard's bot) writes it: `GPQA (0-shot)`."""
    return _CARD_LABELS[key].format(n=LEADERBOARD_SHOTS.get(key) if shots is None else shots)


# ----------------------------------------------------------------------------- reading results


def _entries(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Task and group entries by name. Groups sit in `results` (lm-eval >= 0.4.3) and in
    `groups` (older files have them only there)."""
    entries: dict[str, Mapping[str, Any]] = dict(results.get("groups") or {})
    entries.update(results.get("results") or {})
    return entries


def _number(value: Any) -> float | None:
    """A metric value as float; None for "N/A", null, NaN and anything non-numeric."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def metric_value(results: Mapping[str, Any], task: str, metric: str) -> float | None:
    """`results[task]["<metric>,none"]` as a fraction, or None when absent."""
    entry = _entries(results).get(task)
    return None if entry is None else _number(entry.get(f"{metric},none"))


def _size_weighted(
    results: Mapping[str, Any], subtasks: Sequence[str], metric: str
) -> float | None:
    """Mean of the subtasks' values weighted by their evaluated sample counts, as lm-eval's
    groups with `weight_by_size: true` compute it; None unless every subtask is there."""
    n_samples = results.get("n-samples") or {}
    total = weight = 0.0
    for task in subtasks:
        value = metric_value(results, task, metric)
        size = (n_samples.get(task) or {}).get("effective")
        if value is None or not size:
            return None
        total, weight = total + value * size, weight + size
    return total / weight


def _group_value(results: Mapping[str, Any], bench: Benchmark, metric: str) -> float | None:
    """lm-eval's group value; rebuilt from the subtasks when the group entry is absent (a run
    that listed the subtasks) or lacks the metric (MATH's `exact_match_original`)."""
    value = metric_value(results, bench.task, metric)
    if value is not None or not bench.subtasks:
        return value
    return _size_weighted(results, bench.subtasks, metric)


def _mean_of_all(values: Sequence[float | None]) -> float | None:
    """Plain mean, or None when any value is missing (a partial mean would mislead)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present and len(present) == len(values) else None


def _metric(bench: Benchmark, math_metric: str) -> str:
    return math_metric if bench.name == "MATH Lvl 5" else bench.metric


def _ifeval(results: Mapping[str, Any]) -> float | None:
    return _mean_of_all([metric_value(results, "leaderboard_ifeval", m) for m in IFEVAL_METRICS])


def _check_math_metric(math_metric: str) -> None:
    if math_metric not in MATH_METRICS:
        raise EvaluationError(f"math_metric must be one of {', '.join(MATH_METRICS)}, not {math_metric!r}")


# ----------------------------------------------------------------------------- the tables


def normalize(value: float, baseline: float) -> float:
    """The leaderboard's normalization in percent: baseline -> 0, 1 -> 100, clamped at 0."""
    return max(0.0, (value - baseline) / (1.0 - baseline)) * 100.0


def _with_average(table: dict[str, float | None]) -> dict[str, float | None]:
    table[AVERAGE] = _mean_of_all([table[name] for name in CARD_ROWS])
    return table


def card_table(
    results: Mapping[str, Any], math_metric: str = "exact_match"
) -> dict[str, float | None]:
    """The seed card's table: raw scores x 100 keyed by `TABLE_KEYS`; None = missing.

    `math_metric="exact_match_original"` gives the pre-2025 parser's MATH score from an
    lm-eval >= 0.4.9 run, the one comparable with cards written before 2025-02-14.
    """
    _check_math_metric(math_metric)
    table: dict[str, float | None] = {}
    for bench in BENCHMARKS:
        if bench.name == "IFEval":
            raw = _ifeval(results)
        else:
            raw = _group_value(results, bench, _metric(bench, math_metric))
        table[bench.name] = None if raw is None else raw * 100.0
    return _with_average(table)


def _normalized(results: Mapping[str, Any], bench: Benchmark, math_metric: str) -> float | None:
    if bench.name == "IFEval":
        raw = _ifeval(results)
        return None if raw is None else normalize(raw, 0.0)
    if bench.choices:
        normalized = []
        for task, choices in bench.choices.items():
            value = metric_value(results, task, bench.metric)
            if value is None:
                return None  # a partial BBH / MuSR is not the benchmark
            normalized.append(normalize(value, 1.0 / choices))
        return sum(normalized) / len(normalized)
    raw = _group_value(results, bench, _metric(bench, math_metric))
    return None if raw is None else normalize(raw, bench.baseline)


def leaderboard_table(
    results: Mapping[str, Any], math_metric: str = "exact_match"
) -> dict[str, float | None]:
    """The leaderboard's normalized table in percent, keyed by `TABLE_KEYS`; None = missing."""
    _check_math_metric(math_metric)
    table = {bench.name: _normalized(results, bench, math_metric) for bench in BENCHMARKS}
    return _with_average(table)


def has_leaderboard_tasks(results: Mapping[str, Any]) -> bool:
    """True when any of the six benchmarks (or one of their subtasks) was evaluated."""
    names = set(_entries(results))
    return any(names & {b.task, *b.subtasks} for b in BENCHMARKS)


def task_scores(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Every task's and group's main metrics, `{task: {metric: value}}`, values as lm-eval
    reports them (fractions). Stderrs, counts and "N/A" are dropped; the filter is kept in the
    name only when it is not "none" (`exact_match,strict-match`)."""
    out: dict[str, dict[str, float]] = {}
    entries = _entries(results)
    for task in sorted(entries):
        metrics: dict[str, float] = {}
        for key, raw in entries[task].items():
            metric, sep, filt = key.partition(",")
            value = _number(raw)
            if not sep or metric.endswith("_stderr") or value is None:
                continue
            metrics[metric if filt == "none" else key] = value
        if metrics:
            out[task] = metrics
    return out


def benchmark_shots(results: Mapping[str, Any]) -> dict[str, int]:
    """Few-shot count of each benchmark as run (`n-shot`), else the leaderboard's.

    Subtasks are asked first: older lm-eval files give groups an `n-shot` of 0.
    """
    n_shot = results.get("n-shot") or {}
    shots = {}
    for bench in BENCHMARKS:
        values = {n_shot.get(task) for task in bench.subtasks or (bench.task,)}
        if len(values) != 1 or not isinstance(next(iter(values)), int):
            values = {n_shot.get(bench.task)}
        value = next(iter(values))
        shots[bench.name] = value if isinstance(value, int) else bench.shots
    return shots


def scores_document(results: Mapping[str, Any], math_metric: str = "exact_match") -> dict[str, Any]:
    """What goes into a grid point's `scores.json`.

    `tasks` holds fractions as lm-eval reports them; `card` and `leaderboard` hold percent
    (unrounded) and are null when no leaderboard task was evaluated.
    """
    leaderboard = has_leaderboard_tasks(results)
    return {
        "format": "remerge.scores/1",
        "tasks": task_scores(results),
        "card": card_table(results, math_metric) if leaderboard else None,
        "leaderboard": leaderboard_table(results, math_metric) if leaderboard else None,
        "math_metric": math_metric if leaderboard else None,
    }


# ----------------------------------------------------------------------------- display


def format_percent(value: float | None) -> str:
    """Two decimals, half up (43.065 -> "43.07", as on the seed card); "missing" for None.

    Rounding to 10 places first removes binary noise (258.39 / 6 = 43.064999...96 in floats).
    """
    if value is None:
        return MISSING
    exact = Decimal(f"{value:.10f}")
    return str(exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def card_markdown(table: Mapping[str, float | None], shots: Mapping[str, int] | None = None) -> str:
    """The card's markdown table in the seed's format (Average first, shot counts in names):

    |      Metric       |Value|
    |-------------------|----:|
    |Average Score      |43.07|
    |IFEval (0-Shot)    |80.96|
    """
    shots = {**LEADERBOARD_SHOTS, **(shots or {})}
    rows = [
        (_CARD_LABELS[key].format(n=shots.get(key)), format_percent(table.get(key)))
        for key in (AVERAGE, *CARD_ROWS)
    ]
    name_width = max(len("Metric"), *(len(name) for name, _ in rows))
    value_width = max(len("Value"), *(len(value) for _, value in rows))
    lines = [
        f"|{'Metric':^{name_width}}|{'Value':^{value_width}}|",
        f"|{'-' * name_width}|{'-' * (value_width - 1)}:|",
    ]
    lines += [f"|{name:<{name_width}}|{value:>{value_width}}|" for name, value in rows]
    return "\n".join(lines) + "\n"
