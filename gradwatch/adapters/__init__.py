"""Framework adapters, and the one registry every front end picks its adapter from.

Detection never imports a framework: an adapter is tried only when its framework's module is already in
``sys.modules`` (a user holding a model has imported it), and the match is cached per type (as in einops'
``get_backend``). Keras is tried before torch: on the torch backend every Keras layer is also a
``torch.nn.Module``. A new framework is one :class:`~gradwatch.adapters.base.Adapter` subclass and one line in
``_ADAPTERS``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from gradwatch.adapters.base import Adapter, keras2_message

__all__ = ["Adapter", "adapter_for", "framework_of"]


def _keras() -> type[Adapter]:
    from gradwatch.adapters.keras_backends import keras_adapter

    return keras_adapter()


def _torch() -> type[Adapter]:
    from gradwatch.adapters.torch import TorchAdapter

    return TorchAdapter


#: (framework module, loader of its adapter class), tried in this order.
_ADAPTERS: tuple[tuple[str, Callable[[], type[Adapter]]], ...] = (("keras", _keras), ("torch", _torch))
_CACHE: dict[type, type[Adapter]] = {}


def adapter_for(model: Any) -> type[Adapter]:
    """The adapter class that watches ``model``; ``TypeError`` naming the accepted types otherwise.

    Example:
        >>> adapter_for("resnet")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: gradwatch.attach() needs a torch.nn.Module or a keras.Model, received str ('resnet'). Build ...
    """
    cls = _CACHE.get(type(model))
    if cls is not None:
        return cls
    for module, load in _ADAPTERS:
        if module not in sys.modules:
            continue
        cls = load()
        if cls.accepts(model):
            _CACHE[type(model)] = cls
            return cls
    keras2 = keras2_message(model)
    if keras2:
        raise TypeError(keras2)
    shown = repr(model)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise TypeError(
        f"gradwatch.attach() needs a torch.nn.Module or a keras.Model, received {type(model).__name__} ({shown}). "
        "Build the model first and pass the object itself."
    )


def framework_of(model: Any) -> str:
    """``"keras"`` or ``"torch"`` for a model gradwatch can watch (see :func:`adapter_for`)."""
    return adapter_for(model).framework
