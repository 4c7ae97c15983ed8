"""Optional dependencies, loaded on use with an install hint when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that names the extra to install.

    Only a ``ModuleNotFoundError`` for that exact package becomes the hint; a package that is installed but
    broken keeps its own traceback.

    Args:
        module: The import name, e.g. ``"wandb"``.
        extra: The gradwatch extra that installs it, e.g. ``"wandb"``.
        feature: What needs it, for the message, e.g. ``"WandbReporter"``.

    Example:
        >>> require("json", extra="none", feature="a doctest").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is None or err.name.split(".")[0] != top:
            raise
        raise ImportError(
            f"{feature} needs {top}, which is not installed: pip install 'gradwatch[{extra}]'"
        ) from None
