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
- `checkpoint_layout` (optional): how a model that does not store a layer tensor under its
  listed name stores it instead, as transformers 5's conversion mapping for the model type
  says, which mergekit 0.1.5 applies while loading (`mergekit/architecture/conversion.py`):
  `renamed` (fragment -> replacement: a stored `block_sparse_moe.gate.weight` is read as
  `mlp.gate.weight`), then `fused` (layer tensor -> the patterns of its parts, `*` an expert
  index: Mixtral's `mlp.experts.gate_up_proj` is, for each expert in numeric order, its
  `w1.weight` then its `w3.weight`, [E, 2I, H]). See `checkpoint_tensors`.

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
    renamed: Mapping[str, str] = field(default_factory=dict)  # `checkpoint_layout`
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def layer_name(self, index: int | str, suffix: str) -> str:
        """Layer `index`'s tensor `suffix`: (3, "mlp.up_proj.weight") -> model.layers.3.mlp.up_proj.weight"""
        return f"{self.layer_prefix}{index}.{suffix}"

    def is_optional(self, name: str) -> bool:
        """A tensor (or a layer's, by its suffix) that mergekit skips when no model has it."""
        return name in self.optional or (layer_index(name) is not None and layer_suffix(name) in self.optional)

    def is_embedding(self, name: str) -> bool:
        return name in self.embeddings

    def checkpoint_tensors(self, ref: str, shapes: Mapping[str, tuple[int, ...]]
                           ) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """The layer tensors a model (stored tensor -> shape) holds in the checkpoint layout
        only, as mergekit 0.1.5 builds them while loading: name -> (shape, the stored tensors
        whose bytes, one after the other, are its bytes; in their dtype, cast afterwards like
        any input). A tensor stored under its own name is read as it is (mergekit looks for it
        first). A renamed tensor is its one part; a fused one is `torch.cat` of the stacked
        experts of each pattern (`MergeModulelist`, `Concatenate(dim=1)`): per expert, in
        numeric order, its pattern's tensors in turn, shape [experts, sum of their rows, ...]."""
        if not self.renamed and not self.fused:
            return {}
        out: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
        as_read: dict[str, str] = {}  # layer tensor name after renaming -> stored name
        for name in sorted(shapes):
            if layer_index(name) is None:
                continue
            new = name
            for old, replacement in self.renamed.items():
                new = new.replace(old, replacement)
            as_read.setdefault(new, name)
            if new != name and new not in shapes and layer_suffix(new) in self.layer:
                out[new] = (shapes[name], (name,))
        for i in sorted({layer_index(n) for n in as_read}):
            for suffix, patterns in self.fused.items():
                target = self.layer_name(i, suffix)
                if target not in shapes:
                    if fused := self._fuse(ref, target, i, patterns, as_read, shapes):
                        out[target] = fused
        return out

    def _fuse(self, ref: str, target: str, layer: int, patterns: tuple[str, ...],
              as_read: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]):
        """(shape, parts) of one fused layer tensor, None when the model has none of its parts."""
        experts = []  # per pattern: expert index -> stored name
        for pattern in patterns:
            regex = re.compile(re.escape(self.layer_name(layer, pattern)).replace(r"\*", r"(\d+)") + "$")
            experts.append({int(m.group(1)): stored for n, stored in as_read.items()
                            if (m := regex.match(n))})
        if not any(experts):
            return None
        order = sorted(experts[0])
        parts = [[e[k] for e in experts] for k in order] if all(sorted(e) == order for e in experts) else []
        first = [shapes[n] for n in parts[0]] if parts else []
        if not parts or any([shapes[n] for n in p] != first for p in parts) \
                or len({s[1:] for s in first}) != 1:
            raise ModelError(
                f"model {ref}: cannot build {target} from its experts' "
                f"{', '.join(p.replace('*', 'N') for p in patterns)}: every expert needs each of "
                "them, of one shape per pattern (mergekit fails on this model while merging)")
        shape = (len(order), sum(s[0] for s in first), *first[0][1:])
        return shape, tuple(n for p in parts for n in p)


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
        renamed=dict(d.get("checkpoint_layout", {}).get("renamed", {})),
        fused={k: tuple(v) for k, v in d.get("checkpoint_layout", {}).get("fused", {}).items()})


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
