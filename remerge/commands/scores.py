"""`remerge scores RESULTS.json`: the card table (raw) and the leaderboard table (normalized)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from remerge.errors import EvaluationError
from remerge.evaluation import scores
from remerge.io.files import write_json_atomic

CARD_TITLE = "Card table: raw scores x 100 and their mean (the seed model card's format)"
LEADERBOARD_TITLE = (
    "Open LLM Leaderboard table: normalized scores, (score - random baseline) / "
    "(1 - baseline) x 100 per subtask, clamped at 0, subtasks averaged unweighted"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path, metavar="RESULTS.json", help="lm-eval results file")
    parser.add_argument(
        "--json", action="store_true", help='print {"card": {...}, "leaderboard": {...}} (percent)'
    )
    parser.add_argument(
        "--math-metric",
        choices=scores.MATH_METRICS,
        default="exact_match",
        help="MATH Lvl 5 metric: exact_match (Math-Verify with lm-eval >= 0.4.9, the leaderboard "
        "since 2025-02) or exact_match_original (the older parser, as on 2024 cards)",
    )
    parser.add_argument(
        "--out", type=Path, metavar="SCORES.json", help="also write the scores.json document"
    )


def load_results(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise EvaluationError(
            f"results file {path} cannot be read as JSON ({err}): re-run `remerge evaluate`"
        ) from err
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise EvaluationError(
            f'results file {path} has no "results" mapping: give lm-eval\'s results JSON'
        )
    return results


def _text(results: dict[str, Any], math_metric: str, source: Path) -> str:
    if not scores.has_leaderboard_tasks(results):
        lines = [f"no Open LLM Leaderboard task in {source}; per-task scores (lm-eval's values):"]
        for task, metrics in scores.task_scores(results).items():
            lines += [f"  {task}  {metric} = {value:.4f}" for metric, value in metrics.items()]
        return "\n".join(lines) + "\n"
    card = scores.card_table(results, math_metric)
    shots = scores.benchmark_shots(results)
    parts = [
        CARD_TITLE,
        scores.card_markdown(card, shots),
        LEADERBOARD_TITLE,
        scores.card_markdown(scores.leaderboard_table(results, math_metric), shots),
    ]
    missing = [name for name in scores.CARD_ROWS if card[name] is None]
    if missing:
        parts.append(
            f"missing from {source}: {', '.join(missing)} (Average needs all six benchmarks)\n"
        )
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    results = load_results(args.results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, scores.scores_document(results, args.math_metric))
    if args.json:
        tables = {
            "card": scores.card_table(results, args.math_metric),
            "leaderboard": scores.leaderboard_table(results, args.math_metric),
        }
        print(json.dumps(tables, indent=2))
    else:
        print(_text(results, args.math_metric, args.results), end="")
    return 0
