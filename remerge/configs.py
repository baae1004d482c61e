"""The non-tensor files of a merged model: what mergekit writes, and the seed's transplant.

mergekit writes `config.json` from the base model (else the first model) with `torch_dtype`
set to `out_dtype or dtype`, and copies the donor's tokenizer files byte for byte. The seed
merge then went one step further: every `.json` file of the merge except the index was
replaced by the instruct model's ("config transplant"), which also brings its
`generation_config.json` and chat template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

from remerge.errors import ModelError
from remerge.recipe import Recipe
from remerge.layout import INDEX_NAME
from remerge.files import write_bytes_atomic

# Copied from the donor when present, as mergekit's tokenizer copy does.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model")


def donor(recipe: Recipe) -> str:
    """The model whose config and tokenizer the merge takes: the base, else the first model."""
    return recipe.base_model or recipe.inputs[0]


def merged_config(recipe: Recipe, folder: Path) -> dict:
    """The donor's config.json with `torch_dtype` set as mergekit sets it."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ModelError(f"model {donor(recipe)}: cannot read {path}: {err.strerror}") from None
    except ValueError as err:
        raise ModelError(f"model {donor(recipe)}: {path} is not valid JSON: {err}") from None
    dtype = recipe.out_dtype or recipe.dtype
    if dtype:
        config["torch_dtype"] = dtype
    return config


def config_text(config: dict) -> str:
    """JSON as transformers writes configs: sorted keys, two-space indent, final newline."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def write_merge_files(recipe: Recipe, folders: Mapping[str, str | Path], out_dir: Path) -> list[str]:
    """config.json and the donor's tokenizer files, as mergekit writes them; returns the names."""
    src = Path(folders[donor(recipe)])
    out_dir = Path(out_dir)
    written = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out_dir / name)
            written.append(name)
    write_bytes_atomic(out_dir / "config.json", config_text(merged_config(recipe, src)).encode())
    return written + ["config.json"]


def transplant_files(donor_dir: Path) -> list[str]:
    """The files a config transplant takes from the donor: every .json but the index."""
    names = sorted(p.name for p in Path(donor_dir).glob("*.json") if p.name != INDEX_NAME)
    if "config.json" not in names:
        raise ModelError(f"transplant donor {donor_dir} has no config.json")
    return names


def transplant(donor_dir: Path, out_dir: Path) -> list[str]:
    """Replace the merge's .json files (all but the index) with the donor's; returns names."""
    names = transplant_files(donor_dir)
    for name in names:
        write_bytes_atomic(Path(out_dir) / name, (Path(donor_dir) / name).read_bytes())
    return names
