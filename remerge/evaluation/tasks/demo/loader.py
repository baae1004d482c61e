"""lm-eval `custom_dataset` for the demo tasks: the `json` loader, with paths resolved here.

`datasets.load_dataset("json", data_files=...)` resolves a relative path against the current
directory, so a task YAML that names `count_up.jsonl` works only when run from this folder.
lm-eval calls `custom_dataset(**metadata, **dataset_kwargs)` instead of loading
`dataset_path` itself; this function resolves `data_files` against this folder and then does
exactly what `dataset_path: json` would have done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def load_json_here(data_files: dict[str, str], **_lm_eval_metadata: Any) -> datasets.DatasetDict:
    """Load `{split: file}` JSON Lines files named relative to this folder."""
    files = {split: str(HERE / name) for split, name in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
