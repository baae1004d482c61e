"""Per-tensor parameter values: each setting of a recipe evaluated for one tensor.

A setting is a number or flag, a gradient over the layers, or a list of `{filter, value}`
entries. mergekit's precedence, first value found wins: the model's own `parameters` (in the
tensor's slice: every source of that model, in order), then the slice's `parameters`, then the
global `parameters`, then the method's default (`remerge.merge.methods`). A `models:` recipe is
one slice without parameters of its own (`Recipe.output_slices`). Global-only parameters skip
the first step. Resolved once per tensor, when the tensor's task is planned
(`remerge.merge.tensor.plan_tensor`).

Filters match a name: global-only parameters the output tensor's, per-model ones the tensor
the model is asked for (`TensorPlan.input_name`: in a slice, the layer it reads, so a filter
`layers.2.` selects by source layer there); gradients run over the slice's own layers.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from remerge.errors import RecipeError
from remerge.merge.methods import REQUIRED, Parameter
from remerge.merge.recipe import Recipe, Setting


def evaluate_setting(setting: Setting, tensor: str, t: float) -> Any:
    """The value of one setting for one tensor at layer position `t` in [0, 1], or None.

    Filters: the first entry whose filter is absent, "*" or a substring of the tensor name.
    Gradients: linear interpolation between neighbouring values, as mergekit computes it
    (Python floats: `(1 - frac) * v[i0] + frac * v[i1]`); booleans pick the nearest-below value.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float)):
        return setting
    if all(isinstance(v, dict) for v in setting):
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or flt in tensor:
                return evaluate_setting(cond["value"], tensor, t)
        return None
    if any(isinstance(v, bool) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def resolve(recipe: Recipe, name: str, tensor: str, t: float, model: str | None = None,
            slice: int = 0) -> Any:
    """A parameter's value for a tensor: the model's own settings in the tensor's slice, then
    the slice's, then the global ones, then the default. `tensor`: the name filters match.

    For a model listed more than once in a slice, the first of its entries that sets the
    parameter wins (the releases that accept such a recipe). A parameter the release does not
    read keeps its default, whatever the recipe says.
    """
    param = recipe.method.parameter(name)
    if not param.read_by(recipe.release):
        return param.default
    for params in setting_scopes(recipe, slice, model):
        if name in params:
            value = evaluate_setting(params[name], tensor, t)
            if value is not None:
                return value
    return param.default


def setting_scopes(recipe: Recipe, slice: int, model: str | None) -> list[Mapping[str, Setting]]:
    """Where a parameter may be set, highest precedence first (mergekit's
    `ConfigReader.parameter_sources`): the model's sources in the slice (none for a global-only
    parameter, `model` None), the slice, the recipe."""
    out = recipe.output_slices[slice]
    own = [s.parameters for s in out.sources if s.model == model] if model is not None else []
    return [*own, out.parameters, recipe.parameters]


def check_value(param: Parameter, value: Any, tensor: str, model: str | None) -> Any:
    """Validate a resolved value: flags become booleans, numbers must lie in their range."""
    where = f"`{param.name}` for tensor {tensor}" + (f" of model {model}" if model else "")
    if value is REQUIRED or (value is None and param.default is not None):
        place = "the model's `parameters` or globally" if param.scope == "model" else "the global `parameters`"
        raise RecipeError(f"missing {where}: set it in {place}")
    if value is None:  # an optional parameter left unset
        return None
    if param.kind == "flag":
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{where} must be a number, not {value!r}")
    value = int(value) if param.kind == "integer" else float(value)
    if param.valid is not None and not param.valid(value):
        raise RecipeError(f"{where} is {value:g}; {param.name} must be {param.allowed}")
    return value


def tensor_parameters(
    recipe: Recipe, tensor: str, t: float, models: Sequence[str], slice: int = 0,
    input_names: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Global and per-model parameters of one tensor of slice `slice`, resolved and validated
    (`input_names`: model -> the name its filters match; default: the tensor's own)."""
    method = recipe.method
    names = input_names or {}
    shared = {
        p.name: check_value(p, resolve(recipe, p.name, tensor, t, slice=slice), tensor, None)
        for p in method.scoped("global")
    }
    per_model = {
        m: {
            p.name: check_value(p, resolve(recipe, p.name, names.get(m, tensor), t, m, slice),
                                tensor, m)
            for p in method.scoped("model")
        }
        for m in models
    }
    return shared, per_model
