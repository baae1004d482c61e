"""Which tensors a model of each architecture has, as mergekit 0.1.5 plans them: data, one file
per architecture in `remerge/merge/architectures/*.json`, read by the small lookups below.

    architecture_of(ref, config) -> Architecture     from config.json, else a one-line ModelError
    arch.layer_name(3, "mlp.up_proj.weight") -> "model.layers.3.mlp.up_proj.weight"

A file holds (our format; the facts are those of the file of mergekit 0.1.5 that `source` names):

- `architectures`: the `architectures[0]` values of config.json it covers; `model_type`
  (resolves a config.json without `architectures`); `layers_key`: the config key holding the
  number of layers;
- `pre`, `post`: the tensors before and after the layers; `layer_prefix` + N + `.` + each of
  `layer`: decoder layer N's tensors. Each list in mergekit's plan order (it decides which of
  two tensors that read the same name mergekit saves first, `remerge.merge.schedule`);
- `optional`: tensors (or layer suffixes) mergekit leaves out when none of the models it reads
  them from has them (a tied `lm_head.weight`); every other one is required;
- `tied`: tensor -> the tensor a model without it reads instead (`lm_head.weight` ->
  `model.embed_tokens.weight`), in releases that read one (`Release.lm_head_fallback`);
- `embeddings`: the tensors indexed by token id (mergekit's `vocabulary_axis`);
- `unsupported_layouts` (optional): name fragment -> why remerge refuses a model storing
  tensors named so (Mixtral's per-expert layout, which mergekit converts while loading).

Tensors a model stores that its architecture does not list are not merged: mergekit ignores
them. The layers of every architecture here are named `<prefix>layers.N.`, which the name
helpers (`layer_index`, `with_layer_index`) rely on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Mapping

from remerge.errors import ModelError

DATA = Path(__file__).resolve().parent / "architectures"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Architecture:
    name: str  # the config.json `architectures[0]` it was found by, e.g. "LlamaForCausalLM"
    model_type: str
    layers_key: str
    pre: tuple[str, ...]
    layer_prefix: str
    layer: tuple[str, ...]  # suffixes after `<layer_prefix>N.`
    post: tuple[str, ...]
    optional: frozenset[str] = frozenset()
    tied: Mapping[str, str] = field(default_factory=dict)
    embeddings: tuple[str, ...] = ()
    unsupported_layouts: Mapping[str, str] = field(default_factory=dict)

    def layer_name(self, index: int | str, suffix: str) -> str:
        """Layer `index`'s tensor `suffix`: (3, "mlp.up_proj.weight") -> model.layers.3.mlp.up_proj.weight"""
        return f"{self.layer_prefix}{index}.{suffix}"

    def is_optional(self, name: str) -> bool:
        """A tensor (or a layer's, by its suffix) that mergekit skips when no model has it."""
        return name in self.optional or (layer_index(name) is not None and layer_suffix(name) in self.optional)

    def is_embedding(self, name: str) -> bool:
        return name in self.embeddings

    def refusal(self, names: list[str]) -> str | None:
        """Why remerge refuses a model storing these tensor names, else None."""
        return next((why for part, why in self.unsupported_layouts.items()
                     if any(part in n for n in names)), None)


@cache
def _table() -> dict[str, dict]:
    """architectures[0] -> its file's data (with `name`), from every file in DATA."""
    table = {}
    for path in sorted(DATA.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for name in data["architectures"]:
            table[name] = {**data, "name": name}
    return table


def known_architectures() -> list[str]:
    return sorted(_table())


@cache
def architecture(name: str) -> Architecture:
    """The architecture of an `architectures[0]` value (KeyError if unknown)."""
    d = _table()[name]
    return Architecture(
        name=name, model_type=d["model_type"], layers_key=d["layers_key"], pre=tuple(d["pre"]),
        layer_prefix=d["layer_prefix"], layer=tuple(d["layer"]), post=tuple(d["post"]),
        optional=frozenset(d["optional"]), tied=dict(d["tied"]), embeddings=tuple(d["embeddings"]),
        unsupported_layouts=dict(d.get("unsupported_layouts", {})))


def architecture_name(config: Mapping) -> str | None:
    """config.json's `architectures[0]`; without that list, the architecture whose
    `model_type` it gives (when one does); else None."""
    names = config.get("architectures")
    if isinstance(names, list) and names:
        return str(names[0])
    by_type = sorted({d["architectures"][0] for d in _table().values()
                      if d["model_type"] == config.get("model_type")})
    return by_type[0] if len(by_type) == 1 else None


def architecture_of(ref: str, config: Mapping) -> Architecture:
    """The architecture of model `ref` from its config.json (a dict); one line if unknown."""
    name = architecture_name(config)
    if name not in _table():
        what = (f"architecture '{name}' is not one remerge knows" if name else
                "config.json has no `architectures` and its model_type "
                f"{config.get('model_type')!r} is not one remerge knows")
        raise ModelError(
            f"model {ref}: {what} (known: {', '.join(known_architectures())}); remerge merges only "
            "architectures whose tensors it has from mergekit's definitions "
            "(remerge/merge/architectures/), and does not guess")
    return architecture(name)


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (`model.layers.3.mlp...` -> 3), else None."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def with_layer_index(name: str, index: int) -> str:
    """The same tensor of another layer: (`model.layers.3.mlp.up_proj.weight`, 7) ->
    `model.layers.7.mlp.up_proj.weight`."""
    match = _LAYER_RE.search(name)
    return f"{name[:match.start(1)]}{index}{name[match.end(1):]}"


def layer_suffix(name: str) -> str:
    """What a layer's tensor is, without the layer: `model.layers.3.mlp.up_proj.weight` ->
    `mlp.up_proj.weight`."""
    return name[_LAYER_RE.search(name).end():]
