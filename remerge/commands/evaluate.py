"""`remerge evaluate MODEL_DIR --out results.json`: evaluate a model folder with lm-eval."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from remerge.errors import EvaluationError
from remerge.evaluation.settings import DTYPES, PRESETS, EvalSettings


def _batch_size(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _limit(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def _chat(text: str) -> bool | str:
    return {"true": True, "false": False, "auto": "auto"}[text]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="local model folder")
    parser.add_argument("--out", type=Path, metavar="RESULTS.json", help="lm-eval's results JSON")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items()),
    )
    parser.add_argument(
        "--tasks", help="comma-separated lm-eval tasks/groups (replace the preset's)"
    )
    parser.add_argument(
        "--include-path", action="append", default=[], metavar="DIR", help="folder of task YAMLs"
    )
    parser.add_argument("--limit", type=_limit, help="examples per task (a fraction if < 1)")
    parser.add_argument("--batch-size", type=_batch_size, help="an int, auto or auto:N")
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--device", help="cpu (default), cuda, cuda:N, ...")
    parser.add_argument(
        "--apply-chat-template",
        type=_chat,
        choices=[True, False, "auto"],
        metavar="{true,false,auto}",
    )
    parser.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction)
    parser.add_argument("--seed", type=int, help="one seed for all of lm-eval's (default: its own)")
    parser.add_argument("--num-fewshot", type=int, help="override every task's few-shot count")
    parser.add_argument("--log-samples", action="store_true", default=None)
    parser.add_argument("--samples-dir", type=Path, help="per-sample logs (implies --log-samples)")
    parser.add_argument("--trust-remote-code", action="store_true", default=None)
    parser.add_argument(
        "--check", action="store_true", help="only run the checks that precede loading the model"
    )


_FIELDS = (
    "limit",
    "batch_size",
    "dtype",
    "device",
    "apply_chat_template",
    "fewshot_as_multiturn",
    "seed",
    "num_fewshot",
    "log_samples",
    "trust_remote_code",
)


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """Only the options given override the preset's defaults."""
    given: dict[str, Any] = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
    return EvalSettings.create(args.preset, args.tasks, args.include_path, **given)


def run(args: argparse.Namespace) -> int:
    from remerge.evaluation.preflight import check_model_dir, preflight, resolve_chat_template
    from remerge.evaluation.run import evaluate_model

    settings = settings_from_args(args)
    if args.check:
        check_model_dir(args.model_dir)
        resolve_chat_template(args.model_dir, settings)
        preflight(settings)
        print(f"ok: {args.model_dir} can be evaluated on {', '.join(settings.tasks)}")
        return 0
    if args.out is None:
        raise EvaluationError("--out RESULTS.json is required (unless --check)")
    evaluate_model(args.model_dir, settings, args.out, args.samples_dir)
    print(f"wrote {args.out}")
    return 0
