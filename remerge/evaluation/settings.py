"""Evaluation settings: the presets, the dtypes, the tasks of local task folders, and
`EvalSettings` with its validation (each bad setting a one-line EvaluationError naming it
and the fix).

Nothing here imports lm-eval, torch or datasets: the workflow reads the settings (and
`needs_gpu`) at no cost.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from remerge.errors import EvaluationError
from remerge.evaluation.scores import LEADERBOARD_TASKS

DEMO_TASKS_DIR = Path(__file__).parent / "tasks" / "demo"
DTYPES = ("auto", "float32", "float16", "bfloat16")
ChatTemplate = bool | Literal["auto"]


# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """Defaults for `EvalSettings`; `tasks=None` means every task YAML in `include_path`."""

    description: str
    tasks: tuple[str, ...] | None
    include_path: tuple[str, ...] = ()
    batch_size: int | str = 1
    apply_chat_template: ChatTemplate = False
    fewshot_as_multiturn: bool = False


PRESETS: dict[str, Preset] = {
    # The leaderboard ran batch_size=auto, the model's own dtype, and for instruct models
    # apply_chat_template + fewshot_as_multiturn; "auto" applies the template exactly when the
    # model folder ships one, so base references run without it. Few-shot counts come from
    # the task YAMLs (3 for BBH, 4 for MATH, 5 for MMLU-PRO, 0 for the rest).
    "leaderboard": Preset(
        description="the six Open LLM Leaderboard v2 benchmarks with the leaderboard's flags",
        tasks=LEADERBOARD_TASKS,
        batch_size="auto",
        apply_chat_template="auto",
        fewshot_as_multiturn=True,
    ),
    "demo": Preset(
        description="the embedded demo's local offline tasks (remerge/evaluation/tasks/demo/)",
        tasks=None,
        include_path=(str(DEMO_TASKS_DIR),),
        batch_size=8,
    ),
}


class _TolerantLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without resolving `!function` tags (no task code runs)."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def discover_tasks(folder: str | Path) -> tuple[str, ...]:
    """Names of the tasks defined by the YAML files of a folder (recursively), sorted.

    Group YAMLs are skipped: their member tasks are listed (and so run) on their own.
    """
    folder = Path(folder)
    names = set()
    for path in sorted(folder.rglob("*.yaml")):
        try:
            config = yaml.load(path.read_text(), Loader=_TolerantLoader)
        except yaml.YAMLError as err:
            raise EvaluationError(f"task file {path} is not valid YAML: {err}") from err
        if isinstance(config, dict) and isinstance(config.get("task"), str):
            names.add(config["task"])
    if not names:
        raise EvaluationError(
            f"no lm-eval task YAML in {folder}: add task files there (a YAML with a `task:` "
            "name) or choose tasks with `tasks:` / --tasks"
        )
    return tuple(sorted(names))


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides an evaluation, besides the model folder.

    `apply_chat_template="auto"`: on when the model folder ships a chat template.
    `seed=None` keeps lm-eval's own seeds (0 for `random`, 1234 for numpy, torch and the
    few-shot sampler), which is what the leaderboard ran; an int sets all four.
    """

    tasks: tuple[str, ...]
    preset: str | None = None  # where the defaults came from; recorded, not used
    include_path: tuple[str, ...] = ()  # extra folders of task YAMLs
    limit: int | float | None = None  # examples per task (a fraction when < 1); for testing
    batch_size: int | str = 1  # an int, "auto" or "auto:N"
    dtype: str = "auto"  # "auto" = the dtype in the model's config.json
    device: str = "cpu"
    apply_chat_template: ChatTemplate = False
    fewshot_as_multiturn: bool = False
    seed: int | None = None
    num_fewshot: int | None = None  # None: each task's own few-shot count
    log_samples: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def create(
        cls,
        preset: str | None = None,
        tasks: Sequence[str] | str | None = None,
        include_path: Sequence[str | Path] = (),
        **fields: Any,
    ) -> EvalSettings:
        """Settings from a preset's defaults, then the given fields on top.

        Explicit `tasks` replace the preset's (the leaderboard's flags on a subset of its
        tasks); `include_path` adds to the preset's folders.
        """
        base: dict[str, Any] = {}
        folders = tuple(str(p) for p in include_path)
        if preset is not None:
            if preset not in PRESETS:
                raise EvaluationError(
                    f"unknown evaluation preset {preset!r}: choose one of {sorted(PRESETS)}"
                )
            chosen = PRESETS[preset]
            folders = chosen.include_path + folders
            base = {
                "batch_size": chosen.batch_size,
                "apply_chat_template": chosen.apply_chat_template,
                "fewshot_as_multiturn": chosen.fewshot_as_multiturn,
            }
            if tasks is None:
                tasks = chosen.tasks or _discover_all(chosen.include_path)
        if tasks is None:
            raise EvaluationError("no tasks to evaluate: give `tasks` or a `preset`")
        names = tuple(t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks))
        return cls(tasks=names, preset=preset, include_path=folders, **{**base, **fields})

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> EvalSettings:
        """Settings from a config mapping (`preset`, `tasks` and the field names)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise EvaluationError(
                f"unknown evaluation setting(s) {unknown}: known settings are {sorted(known)}"
            )
        return cls.create(**dict(config))

    def record(self) -> dict[str, Any]:
        """JSON-safe dict of the settings (lists for tuples)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _discover_all(folders: Iterable[str]) -> tuple[str, ...]:
    return tuple(name for folder in folders for name in discover_tasks(folder))


def _validate(s: EvalSettings) -> None:
    """Reject settings lm-eval would only fail on late, naming the setting and the fix."""
    if not s.tasks or any(not t for t in s.tasks):
        raise EvaluationError(f"tasks {list(s.tasks)}: give one or more non-empty task names")
    if s.dtype not in DTYPES:
        raise EvaluationError(f"dtype {s.dtype!r}: choose one of {list(DTYPES)}")
    if s.apply_chat_template not in (True, False, "auto"):
        raise EvaluationError(
            f'apply_chat_template {s.apply_chat_template!r}: use true, false or "auto"'
        )
    if s.limit is not None and (
        not isinstance(s.limit, int | float) or isinstance(s.limit, bool) or s.limit <= 0
    ):
        raise EvaluationError(f"limit {s.limit!r}: use a positive count, a fraction < 1, or none")
    if not _valid_batch_size(s.batch_size):
        raise EvaluationError(
            f'batch_size {s.batch_size!r}: use a positive int, "auto" or "auto:N"'
        )
    if s.num_fewshot is not None and (not isinstance(s.num_fewshot, int) or s.num_fewshot < 0):
        raise EvaluationError(f"num_fewshot {s.num_fewshot}: use 0 or more, or none")


def _valid_batch_size(value: int | str) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value > 0
    head, _, factor = str(value).partition(":")
    return head == "auto" and (not factor or factor.isdigit())


def needs_gpu(settings: EvalSettings) -> bool:
    """Whether the evaluation runs on a CUDA device (for the rule's `resources: gpu=1`)."""
    return settings.device == "cuda" or settings.device.startswith("cuda:")
