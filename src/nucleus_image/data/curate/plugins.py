"""Loading a pluggable scorer named in the config: a built-in by name, or any "package.module:Factory"."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def load_plugin(spec: str, builtins: dict[str, Callable[[], object]], kind: str) -> object:
    """An instance: builtins[spec]() or Factory() imported from "package.module:Factory"."""
    if spec in builtins:
        return builtins[spec]()
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"{kind} {spec!r}: expected one of {sorted(builtins)} or 'package.module:Factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{kind} {spec!r} cannot be loaded: {err}") from None
    return factory()
