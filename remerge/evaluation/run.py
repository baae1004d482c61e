"""Run lm-eval in-process on a model folder and keep what it returns.

`evaluate_model` checks the folder and the tasks (`remerge.evaluation.preflight`), loads the
model, runs `lm_eval.simple_evaluate` with the settings' seeds, and writes lm-eval's full
results JSON, annotated with the settings, and, when asked, its per-sample logs.
`evaluate_and_score` is the workflow's evaluation job: those results, then `scores.json`.

lm-eval (and with it torch) is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remerge.errors import EvaluationError
from remerge.evaluation.preflight import (
    check_model_dir,
    preflight,
    resolve_chat_template,
    task_manager_for,
)
from remerge.evaluation.scores import scores_document
from remerge.evaluation.settings import EvalSettings
from remerge.hub.manifest import read_manifest
from remerge.io.files import remove_stale_temporaries, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- model


def _model_args(model_dir: Path, settings: EvalSettings) -> dict[str, Any]:
    return {
        "pretrained": str(model_dir),
        "dtype": settings.dtype,
        "trust_remote_code": settings.trust_remote_code,
    }


def _load_model(model_dir: Path, settings: EvalSettings) -> Any:
    """lm-eval's HF model wrapper; any failure names the folder."""
    from lm_eval.api.registry import get_model

    try:
        return get_model("hf").create_from_arg_obj(
            _model_args(model_dir, settings),
            {"batch_size": settings.batch_size, "device": settings.device},
        )
    except Exception as err:  # noqa: BLE001 - whatever transformers raises, the folder is at fault
        raise EvaluationError(
            f"model folder {model_dir} does not load on {settings.device} "
            f"({type(err).__name__}: {err}); check its config.json and weight files (re-run "
            "the step that wrote it) and the device"
        ) from err


# ----------------------------------------------------------------------------- evaluation


def evaluate_model(
    model_dir: str | Path,
    settings: EvalSettings,
    results_path: str | Path,
    samples_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a model folder; write lm-eval's results JSON (and per-sample logs) atomically.

    Per-sample logs are written when `settings.log_samples` is on or `samples_dir` is given,
    as `<samples_dir>/<task>.jsonl` (default: `samples/` next to the results file). The
    results JSON is lm-eval's, plus a `remerge` entry recording the settings. Returns it.
    """
    import lm_eval

    model_dir = Path(model_dir).resolve()
    check_model_dir(model_dir)
    chat = resolve_chat_template(model_dir, settings)
    preflight(settings)  # before the model load, which can take minutes
    log.info("loading %s on %s for %s", model_dir, settings.device, ", ".join(settings.tasks))
    lm = _load_model(model_dir, settings)
    log_samples = settings.log_samples or samples_dir is not None
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(settings.tasks),
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            bootstrap_iters=0,  # no stderr: bootstrapping costs minutes and no table uses it
            log_samples=log_samples,
            apply_chat_template=chat,
            fewshot_as_multiturn=settings.fewshot_as_multiturn and chat,
            task_manager=task_manager_for(settings),
            **_seeds(settings),
        )
    except (KeyError, FileNotFoundError, ModuleNotFoundError) as err:
        # what preflight could not foresee: a task's own code or data failing to load
        raise EvaluationError(f"lm-eval could not run tasks {list(settings.tasks)}: {err}") from err
    samples = results.pop("samples", None) or {}
    _annotate(results, model_dir, settings, chat)
    if log_samples:  # first: the results file, written last, marks a finished evaluation
        _write_samples(samples_folder(results_path, samples_dir), samples)
    _write_json(Path(results_path), results)
    log.info("wrote %s", results_path)
    return results


def samples_folder(results_path: str | Path, samples_dir: str | Path | None = None) -> Path:
    """Where the per-sample logs go: `samples_dir`, by default `samples/` next to the results."""
    if samples_dir is not None:
        return Path(samples_dir)
    return Path(results_path).with_name("samples")


def _seeds(settings: EvalSettings) -> dict[str, int]:
    """simple_evaluate's four seed arguments; none given keeps lm-eval's defaults."""
    if settings.seed is None:
        return {}
    kinds = ("random", "numpy_random", "torch_random", "fewshot_random")
    return {f"{kind}_seed": settings.seed for kind in kinds}


def _annotate(results: dict[str, Any], model_dir: Path, settings: EvalSettings, chat: bool) -> None:
    """Fill in what simple_evaluate leaves out when handed a model object, and our settings."""
    config = results.setdefault("config", {})
    config.update(
        model="hf",
        model_args=_model_args(model_dir, settings),
        batch_size=settings.batch_size,
        device=settings.device,
    )
    results["remerge"] = {
        "model_dir": str(model_dir),
        "settings": settings.record(),
        "apply_chat_template": chat,  # resolved from "auto"
        "fewshot_as_multiturn": settings.fewshot_as_multiturn and chat,
    }


def _json_text(obj: Any, indent: int | None = 2) -> str:
    from lm_eval.utils import handle_non_serializable  # torch dtypes, numpy ints, sets

    return json.dumps(obj, indent=indent, default=handle_non_serializable, ensure_ascii=False)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, _json_text(obj) + "\n")


def _write_samples(folder: Path, samples: Mapping[str, list[Any]]) -> None:
    """One JSONL file per task, built in a temporary folder that replaces `folder` whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run with the same pid
    tmp.mkdir()
    try:
        for task, rows in sorted(samples.items()):
            lines = (_json_text(row, indent=None) for row in rows)
            (tmp / f"{task}.jsonl").write_text(
                "".join(f"{line}\n" for line in lines), encoding="utf-8"
            )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- workflow job


def evaluate_and_score(
    model_dir: str | Path | None,
    manifest: str | Path | None,
    settings: Mapping[str, Any],
    samples_dir: str | Path | None,
    results_path: str | Path,
    scores_path: str | Path,
) -> None:
    """The workflow's evaluation job: lm-eval's full results, then `scores.json` (task scores
    and, for leaderboard tasks, the card and leaderboard tables).

    The model folder is `model_dir`, else the one the download `manifest` names; `settings`
    is a mapping for `EvalSettings.from_mapping`.
    """
    folder = model_dir or read_manifest(manifest)["path"]
    _clear_stale(results_path, scores_path, samples_folder(results_path, samples_dir))
    results = evaluate_model(folder, EvalSettings.from_mapping(settings), results_path, samples_dir)
    write_json_atomic(scores_path, scores_document(results))


def _clear_stale(*outputs: str | Path) -> None:
    """Remove the temporaries a killed earlier attempt of this job left next to its outputs
    (nothing would ever remove them otherwise)."""
    for output in outputs:
        for tmp in remove_stale_temporaries(output):
            log.info("removed %s, left by an interrupted earlier run", tmp)
