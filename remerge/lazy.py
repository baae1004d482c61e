"""`import torch`, deferred to the first use: modules that compute with torch in their function
bodies only (the merge methods) can then be imported by torch-free code (recipe validation in
the Snakefile, the plan and card jobs) without paying the seconds torch takes to import."""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands for a module; the module is imported when an attribute is first read."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name}>"


def lazy_import(name: str) -> Any:
    return LazyModule(name)
