"""Checks made before a model is loaded (loading can take minutes), one fix-it message each.

`find_problems` / `preflight` find what would otherwise fail minutes or hours in: unknown task
names (with "did you mean"), the Python packages a task's code imports, NLTK's `punkt_tab` for
IFEval, local data files that are not there, and datasets that are not in the local cache
while the hub is switched off (naming gated ones). Also here: the lm-eval task index they read
(`task_manager_for`, `resolve_tasks`) and the model folder's checks (`check_model_dir`, and
`resolve_chat_template` for whether to apply its chat template).

lm-eval, datasets and nltk are imported inside the functions that need them.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remerge.errors import EvaluationError
from remerge.evaluation.settings import EvalSettings

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


# ----------------------------------------------------------------------------- task index


@lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...], include_defaults: bool) -> TaskManager:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)


def task_manager_for(settings: EvalSettings) -> TaskManager:
    """An lm-eval TaskManager that knows the settings' tasks.

    Indexing lm-eval's ~14,000 built-in task YAMLs takes about 7 s per process, so when every
    task resolves from `include_path` alone (the demo), only that folder is indexed.
    """
    if settings.include_path:
        local = _task_manager(settings.include_path, False)
        if not resolve_tasks(local, settings.tasks)[1]:
            return local
    return _task_manager(settings.include_path, True)


def resolve_tasks(
    manager: TaskManager, names: Iterable[str]
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Leaf tasks (name -> YAML config, includes merged) under the given names, following
    groups and tags; and the names the index does not know."""
    index = manager.task_index
    leaves: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []

    def visit(item: str | Mapping[str, Any]) -> None:
        if isinstance(item, Mapping):  # an inline entry of a group's `task:` list
            if "group" in item:
                for child in _as_list(item.get("task")):
                    visit(child)
                return
            name = str(item.get("task"))
            entry = index.get(name)
            leaves[name] = {**((entry.cfg or {}) if entry else {}), **item}
            return
        entry = index.get(item)
        if entry is None:
            unknown.append(item)
        elif entry.kind.name == "GROUP":
            for child in _as_list((entry.cfg or {}).get("task")):
                visit(child)
        elif entry.kind.name == "TAG":
            for child in sorted(entry.tags):
                visit(child)
        else:
            leaves[item] = dict(entry.cfg or {})

    for name in names:
        visit(name)
    return leaves, unknown


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


# ----------------------------------------------------------------------------- preflight


@dataclass(frozen=True)
class TaskNeeds:
    """What the code of some tasks imports or loads, beyond lm-eval's own requirements."""

    prefixes: tuple[str, ...]  # task names it applies to
    modules: tuple[tuple[str, str], ...]  # (import name, what to pip install)
    nltk_data: tuple[str, ...] = field(default=())  # nltk.data.find resource paths


_IFEVAL_MODULES = (
    ("langdetect", "langdetect"),
    ("immutabledict", "immutabledict"),
    ("nltk", "nltk>=3.9.1"),
)
_MATH_MODULES = (
    ("sympy", "sympy>=1.12"),
    ("math_verify", "math-verify[antlr4_11_0]"),
    ("antlr4", "antlr4-python3-runtime==4.11"),
)
# punkt_tab's English model: lm-eval's IFEval counts sentences with it (nltk maps the old
# `punkt/english.pickle` it asks for onto `punkt_tab/english/`).
PUNKT_TAB = "tokenizers/punkt_tab/english/"

TASK_NEEDS: tuple[TaskNeeds, ...] = (
    # lm-eval 0.4.13's leaderboard IFEval also imports pkg_resources, gone in setuptools 82
    TaskNeeds(
        ("leaderboard_ifeval",),
        (*_IFEVAL_MODULES, ("pkg_resources", "setuptools<82")),
        (PUNKT_TAB,),
    ),
    TaskNeeds(("ifeval",), _IFEVAL_MODULES, (PUNKT_TAB,)),
    TaskNeeds(("leaderboard_math_", "minerva_math"), _MATH_MODULES),
)
# datasets' packaged builders read local files; anything else is a hub dataset
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
_GATED = {
    "Idavidrein/gpqa": "it is gated: accept its terms on huggingface.co and log in "
    "(`hf auth login`) before fetching"
}


def hub_offline() -> bool:
    """Whether the hub is switched off for this process (as huggingface_hub reads it)."""
    truthy = {"1", "ON", "YES", "TRUE"}
    return any(
        os.environ.get(var, "").upper() in truthy
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def find_problems(settings: EvalSettings) -> list[str]:
    """Everything that would make the evaluation fail late, one fix-it message each."""
    manager = task_manager_for(settings)
    leaves, unknown = resolve_tasks(manager, settings.tasks)
    problems = [_unknown_task_message(name, manager, settings) for name in unknown]
    problems += _package_problems(leaves)
    problems += _nltk_problems(leaves)
    problems += _dataset_problems(leaves)
    return problems


def preflight(settings: EvalSettings) -> None:
    """Raise EvaluationError listing every problem `find_problems` finds."""
    problems = find_problems(settings)
    if problems:
        raise EvaluationError(
            "the evaluation would fail:\n" + "\n".join(f"- {p}" for p in problems)
        )


def _unknown_task_message(name: str, manager: TaskManager, settings: EvalSettings) -> str:
    close = difflib.get_close_matches(name, manager.all_tasks, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    where = f" nor in {', '.join(settings.include_path)}" if settings.include_path else ""
    return (
        f"unknown task {name!r}: not an lm-eval task, group or tag{where}{hint} "
        "(`lm-eval ls tasks` lists them; local task YAMLs go in include_path)"
    )


def _needs_of(task: str) -> list[TaskNeeds]:
    return [needs for needs in TASK_NEEDS if task.startswith(needs.prefixes)]


def _package_problems(leaves: Mapping[str, Any]) -> list[str]:
    missing: dict[tuple[str, str], list[str]] = {}  # (module, pip requirement) -> tasks
    for task in leaves:
        for needs in _needs_of(task):
            for module, requirement in needs.modules:
                if importlib.util.find_spec(module) is None:
                    missing.setdefault((module, requirement), []).append(task)
    return [
        f"Python module {module!r}, imported by task(s) {_some(tasks)}, is not installed: "
        f"pip install '{requirement}'"
        for (module, requirement), tasks in missing.items()
    ]


def _some(names: Iterable[str], shown: int = 3) -> str:
    """'a, b, c and 4 more': task lists stay readable for 24 BBH subtasks."""
    names = sorted(set(names))
    rest = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + rest


def _nltk_problems(leaves: Mapping[str, Any]) -> list[str]:
    wanted: dict[str, list[str]] = {}  # resource -> tasks
    for task in leaves:
        for needs in _needs_of(task):
            for resource in needs.nltk_data:
                wanted.setdefault(resource, []).append(task)
    if not wanted or importlib.util.find_spec("nltk") is None:
        return []  # no nltk: already reported as a missing package
    import nltk

    problems = []
    for resource, tasks in wanted.items():
        try:
            nltk.data.find(resource)
        except LookupError:
            problems.append(_nltk_message(resource, tasks, list(nltk.data.path)))
    return problems


def _nltk_message(resource: str, tasks: list[str], search_path: list[str]) -> str:
    package = resource.split("/")[1]  # tokenizers/punkt_tab/english/ -> punkt_tab
    env_dirs = [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    target = env_dirs[0] if env_dirs else str(Path.home() / "nltk_data")
    return (
        f"NLTK data {package!r} ({resource}), used by task(s) {_some(tasks)}, "
        f"is not in any NLTK data folder ({', '.join(search_path)}); offline, lm-eval's own "
        "download fails quietly and its checks then fail mid-run. Fetch it with: "
        f"python -m nltk.downloader -d {target} {package}"
        + ("" if target in search_path else f" (and set NLTK_DATA={target})")
    )


def _dataset_problems(leaves: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Datasets that cannot be opened: local data files that are not there (always), hub
    datasets absent from the cache (only when the hub is off; online they get downloaded)."""
    offline = hub_offline()
    uses: dict[str, list[str]] = {}  # one check per distinct dataset: its load args -> tasks
    for task, config in sorted(leaves.items()):
        path = config.get("dataset_path")
        if not isinstance(path, str) or config.get("custom_dataset"):
            continue
        if path in LOCAL_BUILDERS or offline:
            kwargs = dict(config.get("dataset_kwargs") or {})
            kwargs.pop("trust_remote_code", None)  # datasets >= 4 rejects it; lm-eval drops it too
            key = json.dumps(
                [path, config.get("dataset_name"), kwargs], sort_keys=True, default=str
            )
            uses.setdefault(key, []).append(task)
    problems: list[str] = []
    missing: dict[str, list[tuple[str, str | None]]] = {}  # hub dataset -> (task, config)
    for key, tasks in uses.items():
        path, name, kwargs = json.loads(key)
        error = _open_dataset_error(path, name, kwargs)
        if error is None:
            continue
        if path in LOCAL_BUILDERS:
            problems.append(
                f"task(s) {_some(tasks)}: the {path} data cannot be read ({error}); relative "
                f"data_files are resolved against the current directory ({os.getcwd()}), so give "
                "absolute paths or run from the folder they are relative to"
            )
        else:
            missing.setdefault(path, []).extend((task, name) for task in tasks)
    return problems + [_hub_dataset_message(path, found) for path, found in missing.items()]


def _open_dataset_error(path: str, name: str | None, kwargs: dict[str, Any]) -> str | None:
    """None when datasets can build the dataset from what is here, else the reason."""
    import datasets

    try:
        datasets.load_dataset_builder(path, name, **kwargs)
    except Exception as err:  # noqa: BLE001 - any failure here is "cannot open", with its text
        return f"{type(err).__name__}: {err}"
    return None


def _hub_dataset_message(path: str, uses: list[tuple[str, str | None]]) -> str:
    import datasets

    configs = sorted({name for _, name in uses if name})
    shown = _some(task for task, _ in uses)
    fetch = (
        f"[datasets.load_dataset({path!r}, c) for c in {configs!r}]"
        if configs
        else f"datasets.load_dataset({path!r})"
    )
    gated = f"; {_GATED[path]}" if path in _GATED else ""
    return (
        f"dataset {path!r}{f' (configs {configs})' if configs else ''}, used by task(s) {shown}, "
        f"is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}) and the hub is off "
        "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). Fetch it once with the hub on, into the same "
        f"cache (same HF_HOME): HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 python -c "
        f'"import datasets; {fetch}"{gated}'
    )


# ----------------------------------------------------------------------------- model folder


def has_chat_template(model_dir: str | Path) -> bool:
    """Whether the folder ships a chat template (transformers 5 writes chat_template.jinja;
    older versions put it in tokenizer_config.json or chat_template.json)."""
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def check_model_dir(model_dir: str | Path) -> None:
    """Check the folder's shape without loading it (loading can take minutes)."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise EvaluationError(
            f"model folder {folder} has no config.json: give a folder written by "
            "save_pretrained (or a finished merge)"
        )


def resolve_chat_template(model_dir: str | Path, settings: EvalSettings) -> bool:
    """Whether to apply the chat template to this model ("auto": when it ships one)."""
    templated = has_chat_template(model_dir)
    if settings.apply_chat_template is True and not templated:
        raise EvaluationError(
            f"apply_chat_template is on but model folder {model_dir} has no chat template: "
            'turn it off, or use "auto" to apply it only to models that ship one'
        )
    return (
        templated if settings.apply_chat_template == "auto" else bool(settings.apply_chat_template)
    )
