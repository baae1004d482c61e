"""Per-tensor parameter values: each setting of a recipe evaluated for one tensor.

A setting is a number or flag, a gradient over the layers, or a list of `{filter, value}`
entries. mergekit's precedence: the model's own `parameters`, then the global `parameters`,
then the method's default (`remerge.merge.methods`). Resolved once per tensor, when the
tensor's task is planned (`remerge.merge.tensor.plan_tensor`).
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


def resolve(recipe: Recipe, name: str, tensor: str, t: float, model: str | None = None) -> Any:
    """A parameter's value for a tensor: the model's own entries, then global, then default.

    For a model listed more than once, the first of its entries that sets the parameter wins
    (the releases that accept such a recipe). A parameter the release does not read keeps
    its default, whatever the recipe says.
    """
    param = recipe.method.parameter(name)
    if not param.read_by(recipe.release):
        return param.default
    sources: list[Mapping[str, Setting]] = []
    if model is not None:
        sources += [e.parameters for e in recipe.entries if e.model == model]
    sources.append(recipe.parameters)
    for params in sources:
        if name in params:
            value = evaluate_setting(params[name], tensor, t)
            if value is not None:
                return value
    return param.default


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
    recipe: Recipe, tensor: str, t: float, models: Sequence[str]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Global and per-model parameters of one tensor, resolved and validated."""
    method = recipe.method
    shared = {
        p.name: check_value(p, resolve(recipe, p.name, tensor, t), tensor, None)
        for p in method.scoped("global")
    }
    per_model = {
        m: {
            p.name: check_value(p, resolve(recipe, p.name, tensor, t, m), tensor, m)
            for p in method.scoped("model")
        }
        for m in models
    }
    return shared, per_model
