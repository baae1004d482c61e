"""The non-tensor files of a merged model: what mergekit writes, and the seed's transplant.

mergekit writes `config.json` from the base model (else the first model) with `torch_dtype`
set to `out_dtype or dtype` and, for a `slices:` recipe, `num_hidden_layers` set to the layers
it stacked (nothing else: a per-layer list such as `layer_types` keeps the donor's length), and
copies the donor's tokenizer files byte for byte; with a tokenizer setting or a chat template it
writes the tokenizer with transformers instead, and config.json's `vocab_size` follows a merged
vocabulary (`remerge.merge.tokenizer`). The seed
merge then went one step further: every `.json` file of the merge except the index was
replaced by the instruct model's ("config transplant"), which also brings its
`generation_config.json` and chat template.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from remerge.errors import ModelError
from remerge.io.files import write_bytes_atomic
from remerge.io.layout import INDEX_NAME
from remerge.merge.recipe import Recipe

log = logging.getLogger(__name__)

# The background import of transformers started by start_transformers_import (or None).
_importing: threading.Thread | None = None


def donor(recipe: Recipe) -> str:
    """The model whose config and tokenizer the merge takes: the base, else the first model."""
    return recipe.base_model or recipe.inputs[0]


def _read_config(recipe: Recipe, folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ModelError(f"model {donor(recipe)}: cannot read {path}: {err.strerror}") from None
    except ValueError as err:
        raise ModelError(f"model {donor(recipe)}: {path} is not valid JSON: {err}") from None


def config_text(recipe: Recipe, folder: Path, vocab_size: int | None = None) -> str:
    """config.json of the merge: the donor's config with `torch_dtype = out_dtype or dtype`
    and, for slices, `num_hidden_layers = Recipe.layer_count`, serialized as the followed
    release's transformers writes it (`Release.config_json`).

    "transformers": the release runs on transformers 5 (as remerge does): the config is loaded,
    validated and saved by transformers itself, so the bytes match. "donor_keys_sorted":
    releases of the transformers 4 era: the donor's keys, `_name_or_path` set to its reference,
    sorted, two-space indent. "donor_keys_sorted_dtype": the same as transformers 4.56-4.57
    write it (mergekit 0.1.4): `torch_dtype` renamed `dtype`, no `_name_or_path`.
    `transformers_version` stays the donor's: mergekit's is the author's installed
    transformers, which nothing in the merge records. `vocab_size`: a merged vocabulary's.
    """
    dtype = recipe.out_dtype or recipe.dtype
    layers = {"num_hidden_layers": recipe.layer_count} if recipe.layer_count is not None else {}
    if vocab_size is not None:
        layers["vocab_size"] = vocab_size
    config = _read_config(recipe, folder)
    if recipe.release.config_json == "transformers":
        transformers = _transformers()  # outside the try: a broken install is not a bad config
        try:
            loaded = transformers.AutoConfig.from_pretrained(folder)
        except Exception as err:  # not a config transformers can load: keep the donor's keys
            log.warning("transformers cannot load %s/config.json (%s); writing its keys with "
                        "`dtype` set instead of transformers' serialization", folder, err)
            return json.dumps({**config, **({"dtype": dtype} if dtype else {}), **layers},
                              indent=2, sort_keys=True) + "\n"
        return _transformers_config_text(recipe, loaded, dtype, layers)
    if recipe.release.config_json == "donor_keys_sorted_dtype":
        config.pop("_name_or_path", None)  # transformers 4.56+ writes none
        if "torch_dtype" in config:
            config["dtype"] = config.pop("torch_dtype")
        if dtype:
            config["dtype"] = dtype
    else:
        config["_name_or_path"] = donor(recipe)
        if dtype:
            config["torch_dtype"] = dtype
    config.update(layers)
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def start_transformers_import(recipe: Recipe) -> None:
    """Import transformers (seconds) in a background thread when config.json will need it,
    so that writing config.json after the merge need not wait for it."""
    global _importing
    if recipe.release.config_json != "transformers":
        return
    if _importing is None and "transformers" not in sys.modules:
        _importing = threading.Thread(target=importlib.import_module, args=("transformers",),
                                      name="import-transformers", daemon=True)
        _importing.start()


def _transformers() -> ModuleType:
    """The transformers module, once fully imported: while the background import runs,
    `sys.modules` already holds a half-initialized module (no `AutoConfig` yet)."""
    if _importing is not None:
        _importing.join()
    import transformers

    return transformers


def _transformers_config_text(recipe: Recipe, config: Any, dtype: str | None,
                              layers: Mapping[str, int]) -> str:
    """What mergekit's `save_pretrained` writes: the values set as attributes, the config
    validated as transformers 5 validates it at save time, then serialized."""
    if dtype:
        config.torch_dtype = dtype
    for key, value in layers.items():
        setattr(config, key, value)
    try:
        if hasattr(config, "validate"):
            config.validate()
    except Exception as err:
        cause = getattr(err, "__cause__", None) or err
        raise ModelError(
            f"config.json of model {donor(recipe)}: with num_hidden_layers "
            f"{recipe.layer_count} the config is invalid for transformers ({cause}); mergekit "
            f"{recipe.release.version} fails there, after writing every shard: keep the layer "
            "count, or follow mergekit 0.0.5.1 (--mergekit-version 0.0.5.1), which writes the "
            "donor's per-layer lists unchanged") from None
    return config.to_json_string()  # what save_pretrained writes


def check_config(recipe: Recipe, folders: Mapping[str, str | Path]) -> None:
    """Refuse before merging a slices recipe whose config.json cannot be written (transformers
    5 refuses a `num_hidden_layers` that disagrees with a per-layer list like `layer_types`).
    Only recipes that change the layer count pay for importing transformers."""
    folder = Path(folders[donor(recipe)])
    if recipe.layer_count is None or recipe.release.config_json != "transformers":
        return
    if _read_config(recipe, folder).get("num_hidden_layers") == recipe.layer_count:
        return
    config_text(recipe, folder)


def merged_config(recipe: Recipe, folder: Path, vocab_size: int | None = None) -> dict:
    """The merge's config.json as a dict (for comparisons)."""
    return json.loads(config_text(recipe, folder, vocab_size))


def tokenizer_files(recipe: Recipe, src: Path) -> list[str]:
    """The donor's files that mergekit's tokenizer copy takes (when the donor has
    tokenizer_config.json and tokenizer.json or tokenizer.model), byte for byte."""
    if not (src / "tokenizer_config.json").is_file() or not (
        (src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file()
    ):
        log.warning("model %s has no tokenizer_config.json with tokenizer.json/.model: no "
                    "tokenizer copied (mergekit would re-serialize one with transformers)", donor(recipe))
        return []
    return [n for n in recipe.release.tokenizer_files if (src / n).is_file()]


def copy_tokenizer(recipe: Recipe, src: Path, out_dir: Path) -> list[str]:
    """The donor's tokenizer files, byte for byte; returns the names copied."""
    names = tokenizer_files(recipe, src)
    for name in names:
        shutil.copyfile(src / name, out_dir / name)
    return names


def write_merge_files(recipe: Recipe, folders: Mapping[str, str | Path], out_dir: Path) -> list[str]:
    """config.json and the tokenizer files, as mergekit writes them; returns the names."""
    from remerge.merge.tokenizer import write_tokenizer_files, writes_tokenizer

    src = Path(folders[donor(recipe)])
    vocab_size = None
    if writes_tokenizer(recipe):
        written, vocab_size = write_tokenizer_files(recipe, folders, Path(out_dir))
    else:
        written = copy_tokenizer(recipe, src, Path(out_dir))
    write_bytes_atomic(Path(out_dir) / "config.json", config_text(recipe, src, vocab_size).encode())
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
