"""Evaluate a model folder with lm-eval, in-process; presets; checks that fail early.

`evaluate_model` runs `lm_eval.simple_evaluate` on a local model folder and keeps lm-eval's
full results JSON (and, when asked, its per-sample logs). `preflight` finds, before the model
is loaded, what would otherwise fail minutes or hours in: unknown task names, datasets that
are not in the local cache while the hub is switched off, local data files that are not there,
the Python packages a task's code imports, and NLTK's `punkt_tab` for IFEval.

lm-eval, datasets and nltk are imported inside the functions that need them: importing this
module (for `EvalSettings`, `needs_gpu`, the presets) costs nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from remerge.errors import EvaluationError
from remerge.io.files import write_text_atomic
from remerge.evaluation.scores import LEADERBOARD_TASKS

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

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
        default = Path(results_path).with_name("samples")
        _write_samples(Path(samples_dir) if samples_dir is not None else default, samples)
    _write_json(Path(results_path), results)
    log.info("wrote %s", results_path)
    return results


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
