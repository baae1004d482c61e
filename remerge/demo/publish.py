"""The demo's "published" merges: the seed merge as its author would upload it, and a copy
altered in one bit and one config value, so the demo shows both audit verdicts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping


from remerge.io.files import write_text_atomic
from remerge.merge.recipe import parse_recipe

# The element the altered copy changes (lowest mantissa bit of its first element).
ALTERED_TENSOR = "model.layers.0.mlp.down_proj.weight"


def author_recipe(recipe_text: str, author_paths: Mapping[str, str]) -> str:
    """The recipe as the author wrote it: model references replaced by their local paths."""
    return parse_recipe(recipe_text).with_references(author_paths).text


def author_card(recipe_text: str) -> str:
    """A card shaped like the seed's: mergekit's sections, the recipe in a YAML block."""
    recipe = parse_recipe(recipe_text)
    base = recipe.base_model
    merged = [m for m in recipe.inputs if m != base]
    return (
        "---\nlibrary_name: transformers\ntags:\n- mergekit\n- merge\nlicense: apache-2.0\n---\n"
        "# remerge-demo_TIES_with_Base\n\n"
        "This is a merge of pre-trained language models created using "
        "[mergekit](https://github.com/cg123/mergekit).\n\n"
        "## Merge Details/Method\n\nThis model was merged using the "
        f"[TIES](https://arxiv.org/abs/2306.01708) merge method using {base} as a base. "
        "After the merge, the merge's .json config files (excluding "
        "'model.safetensors.index.json') were replaced with the instruct model's.\n\n"
        "### Models Merged\n\nThe following models were included in the merge:\n"
        + "".join(f"* {m}\n" for m in merged)
        + "\n### Configuration\n\nThe following YAML configuration was used to produce this "
        f"model:\n\n```yaml\n{recipe_text.rstrip()}\n```\n"
    )


def flip_lowest_bit(folder: Path, tensor: str) -> None:
    """Flip the lowest bit of the first element of `tensor`, in place in its shard."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][tensor]
    raw = bytearray(shard.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    start = json.loads(raw[8 : 8 + header_len])[tensor]["data_offsets"][0]
    raw[8 + header_len + start] ^= 1  # little-endian: the first byte holds the lowest bits
    shard.write_bytes(bytes(raw))


def publish_demo(model_dir: str, recipe_text: str, author_paths: Mapping[str, str],
                 passing: str, altered: str) -> None:
    src, ok, bad = Path(model_dir), Path(passing), Path(altered)
    for out in (ok, bad):
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.name not in ("README.md", "mergekit_config.yml"):
                shutil.copyfile(f, out / f.name)
        write_text_atomic(out / "README.md", author_card(author_recipe(recipe_text, author_paths)))
    flip_lowest_bit(bad, ALTERED_TENSOR)
    gen = json.loads((bad / "generation_config.json").read_text())
    gen["temperature"] = round(float(gen.get("temperature", 1.0)) + 0.25, 2)
    write_text_atomic(bad / "generation_config.json", json.dumps(gen, indent=2) + "\n")
