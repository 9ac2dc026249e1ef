"""Shared helpers of the Linen and NNX integrations: module selection and table lookup."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ModuleWhere", "lookup", "module_matcher"]

# Layers are selected by module path ("Dense_0", "layers/0"): a regex (full match), a predicate
# (path, module) -> bool, or None for all.
ModuleWhere = str | re.Pattern | Callable[[str, Any], bool] | None


def module_matcher(where: ModuleWhere) -> Callable[[str, Any], bool]:
    if where is None:
        return lambda path, module: True
    if isinstance(where, (str, re.Pattern)):
        try:
            pattern = re.compile(where) if isinstance(where, str) else where
        except re.error as e:
            raise ValueError(f"where={where!r} is not a valid regular expression: {e}") from e
        return lambda path, module: pattern.fullmatch(path) is not None
    if callable(where):
        return lambda path, module: bool(where(path, module))
    raise ValueError(f"where= must be a regex, a predicate (path, module) -> bool or None, got {where!r}")


def lookup(table: Mapping[str, Any], path: str, what: str) -> Any:
    if path not in table:
        raise ValueError(f"{what} has no entry for module {path!r}; it has {sorted(table)[:20]}")
    return table[path]
