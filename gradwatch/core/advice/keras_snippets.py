"""Keras 3 code for each fix, naming the user's layers."""

from __future__ import annotations

from collections.abc import Sequence

from gradwatch.core.advice.snippets import Snippets, layer_list
from gradwatch.core.structure import LayerInfo

__all__ = ["KerasSnippets"]


def _own_layer(layers: list[LayerInfo]) -> bool:
    """Whether some activation is a layer of its own (``layers.Activation``/``layers.ReLU``), not ``activation=``."""
    return any(la.activation_source == "module" for la in layers)


class KerasSnippets(Snippets):
    def relu(self, layers: list[LayerInfo]) -> str:
        lines = [f"# layers {layer_list(layers)}: use ReLU with He initialization",
                 "layers.Dense(units, activation=\"relu\", kernel_initializer=\"he_normal\")"]
        if _own_layer(layers):
            lines.append(f"# where the activation is its own layer:\nlayers.Activation(\"{layers[0].activation}\")"
                         "   ->   layers.ReLU()")
        return "\n".join(lines)

    def init(self, fix: str, layers: list[LayerInfo]) -> str:
        init = "he_normal" if fix == "he_init" else "glorot_uniform"
        return f"# layers {layer_list(layers)}\nlayers.Dense(units, activation=..., kernel_initializer=\"{init}\")"

    def norm(self, fix: str, layers: list[LayerInfo]) -> str:
        layer = "layers.BatchNormalization()" if fix == "batch_norm" else "layers.LayerNormalization()"
        return f"# after each of {layer_list(layers)}, before its activation:\n{layer}"

    def skip(self, layers: list[LayerInfo]) -> str:
        return (f"# wrap pairs of {layer_list(layers)} in residual blocks:\n"
                "y = layers.Dense(units, activation=\"relu\")(x)\ny = layers.Dense(units)(y)\n"
                "x = layers.Activation(\"relu\")(layers.Add()([x, y]))")

    def clip(self, max_norm: float, amplifying: Sequence[LayerInfo] = ()) -> str:
        code = f"optimizer = keras.optimizers.Adam(learning_rate=..., clipnorm={max_norm:g})"
        if amplifying:
            code += (f"\n# and for the recurrent layers {layer_list(list(amplifying))}:\n"
                     "layers.SimpleRNN(..., recurrent_initializer=\"orthogonal\")")
        return code

    def lr(self, factor: float) -> str:
        return f"optimizer.learning_rate = optimizer.learning_rate / {factor:g}"

    def gated(self, layers: list[LayerInfo]) -> str:
        return f"# replace {layer_list(layers)}:\nlayers.SimpleRNN(units)   ->   layers.LSTM(units)"

    def leaky(self, layers: list[LayerInfo]) -> str:
        code = (f"# layers {layer_list(layers)}:\n"
                "layers.Dense(units, activation=\"leaky_relu\", kernel_initializer=\"he_normal\")")
        if _own_layer(layers):
            code += ("\n# where the activation is its own layer:\n"
                     "layers.ReLU()   ->   layers.LeakyReLU(negative_slope=0.01)")
        return code

    def forget_bias(self, layers: list[LayerInfo]) -> str:
        return (f"# layers {layer_list(layers)}: forget-gate bias 1 (Keras' default; keep it on)\n"
                "layers.LSTM(units, unit_forget_bias=True)")

    def bounded(self, layer: LayerInfo) -> str:
        return (f"# layer {layer.name!r}: activation=\"exponential\" overflows; grow linearly instead\n"
                "layers.Dense(units, activation=\"softplus\")")
