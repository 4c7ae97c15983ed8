"""What a snippet writer provides, and the pick of one per framework."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradwatch.core.structure import LayerInfo

__all__ = ["Snippets", "layer_list"]


def layer_list(layers: Sequence[LayerInfo]) -> str:
    """The user's layer names as a Python list literal."""
    return "[" + ", ".join(repr(la.name) for la in layers) + "]"


class Snippets:
    """Code for one framework that applies a fix, naming the user's layers. One subclass per framework."""

    def relu(self, layers: list[LayerInfo]) -> str:
        raise NotImplementedError

    def init(self, fix: str, layers: list[LayerInfo]) -> str:
        raise NotImplementedError

    def norm(self, fix: str, layers: list[LayerInfo]) -> str:
        raise NotImplementedError

    def skip(self, layers: list[LayerInfo]) -> str:
        raise NotImplementedError

    def clip(self, max_norm: float, amplifying: Sequence[LayerInfo] = ()) -> str:
        raise NotImplementedError

    def lr(self, factor: float) -> str:
        raise NotImplementedError

    def gated(self, layers: list[LayerInfo]) -> str:
        raise NotImplementedError

    def leaky(self, layers: list[LayerInfo]) -> str:
        raise NotImplementedError

    def forget_bias(self, layers: list[LayerInfo]) -> str:
        raise NotImplementedError

    def bounded(self, layer: LayerInfo) -> str:
        raise NotImplementedError
