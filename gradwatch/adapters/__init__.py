"""Framework adapters, chosen by the type of the model.

Detection never imports a framework: a framework is tried only when it is already in ``sys.modules``
(a user holding a model has imported it), and the match is cached per type (as in einops' ``get_backend``).
Keras is tried before torch: on the torch backend every Keras layer is also a ``torch.nn.Module``.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["framework_of"]

_CACHE: dict[type, str] = {}


def _is_keras(obj: Any) -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, keras.Model)


def _is_torch(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def framework_of(model: Any) -> str:
    """``"keras"`` or ``"torch"`` for a model gradwatch can watch; ``TypeError`` naming the accepted types otherwise.

    Example:
        >>> framework_of("resnet")
        Traceback (most recent call last):
        ...
        TypeError: gradwatch.attach() needs a torch.nn.Module or a keras.Model, received str ('resnet'). Build the model first and pass the object itself.
    """
    kind = _CACHE.get(type(model))
    if kind is not None:
        return kind
    for name, test in (("keras", _is_keras), ("torch", _is_torch)):
        if test(model):
            _CACHE[type(model)] = name
            return name
    shown = repr(model)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise TypeError(
        f"gradwatch.attach() needs a torch.nn.Module or a keras.Model, received {type(model).__name__} ({shown}). "
        "Build the model first and pass the object itself."
    )
