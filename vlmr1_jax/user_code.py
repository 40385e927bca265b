"""User functions named in a recipe as 'package.module:function' (rewards, GRPO parts), imported with errors that
name the path and what is wrong with it."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def import_function(path: str, kind: str) -> Callable:
    """The callable at `path` ('package.module:function'); `kind` ("reward", "aggregation", ...) starts each error."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{kind} {path!r}: a user {kind} is written 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{kind} {path!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"{kind} {path!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn
