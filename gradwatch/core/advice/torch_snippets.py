"""PyTorch code for each fix, naming the user's modules."""

from __future__ import annotations

from collections.abc import Sequence

from gradwatch.core.advice.snippets import Snippets, layer_list
from gradwatch.core.structure import LayerInfo

__all__ = ["TorchSnippets"]


class TorchSnippets(Snippets):
    def relu(self, layers: list[LayerInfo]) -> str:
        names = layer_list(layers)
        functional = any(la.activation_source == "functional" for la in layers)
        act = layers[0].activation
        lines = [f"# after layers {names}:"]
        if functional:
            lines.append(f"x = torch.{act}(x)   ->   x = torch.relu(x)")
        else:
            lines.append(f"nn.{'Sigmoid' if act == 'sigmoid' else 'Tanh'}()   ->   nn.ReLU()")
        lines += [f"for name in {names}:  # He init to match ReLU",
                  "    layer = model.get_submodule(name)",
                  "    nn.init.kaiming_normal_(layer.weight, nonlinearity=\"relu\")",
                  "    nn.init.zeros_(layer.bias)"]
        return "\n".join(lines)

    def init(self, fix: str, layers: list[LayerInfo]) -> str:
        names = layer_list(layers)
        if fix == "he_init":
            call = "nn.init.kaiming_normal_(layer.weight, nonlinearity=\"relu\")"
        else:
            act = layers[0].activation if layers[0].activation in ("tanh", "sigmoid") else "linear"
            call = f"nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain({act!r}))"
        return (f"for name in {names}:\n    layer = model.get_submodule(name)\n    {call}\n"
                "    if layer.bias is not None:\n        nn.init.zeros_(layer.bias)")

    def norm(self, fix: str, layers: list[LayerInfo]) -> str:
        names = layer_list(layers)
        first = layers[0]
        if fix == "batch_norm":
            width = first.fan_out if first.kind != "conv" else "out_channels"
            mod = f"nn.BatchNorm{'2d' if first.kind == 'conv' else '1d'}({width})"
        else:
            mod = "nn.LayerNorm(features)"
        return (f"# after each of {names}, before its activation, e.g.\n"
                f"# {first.name} -> activation  becomes  {first.name} -> {mod} -> activation")

    def skip(self, layers: list[LayerInfo]) -> str:
        return (f"# group {layer_list(layers)} into residual blocks (equal widths):\n"
                "class Residual(nn.Module):\n    def __init__(self, block):\n        super().__init__()\n"
                "        self.block = block\n    def forward(self, x):\n        return x + self.block(x)")

    def clip(self, max_norm: float, amplifying: Sequence[LayerInfo] = ()) -> str:
        code = ("loss.backward()\n"
                f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm:g})\n"
                "optimizer.step()")
        if amplifying:
            code += (f"\n# once, before training: recurrent weights at spectral radius 1\n"
                     f"for name in {layer_list(list(amplifying))}:\n"
                     "    rnn = model.get_submodule(name)\n"
                     "    for w in (p for n, p in rnn.named_parameters() if n.startswith(\"weight_hh\")):\n"
                     "        nn.init.orthogonal_(w)")
        return code

    def lr(self, factor: float) -> str:
        return f"for group in optimizer.param_groups:\n    group[\"lr\"] /= {factor:g}"

    def gated(self, layers: list[LayerInfo]) -> str:
        return (f"# replace {layer_list(layers)}:\n"
                "nn.RNN(input_size, hidden_size, ...)   ->   nn.LSTM(input_size, hidden_size, ...)\n"
                "# (nn.LSTM returns (output, (h, c)) instead of (output, h))")

    def leaky(self, layers: list[LayerInfo]) -> str:
        return f"# after layers {layer_list(layers)}:\nnn.ReLU()   ->   nn.LeakyReLU(0.01)"

    def forget_bias(self, layers: list[LayerInfo]) -> str:
        return (f"# once, before training: forget-gate bias 1 in {layer_list(layers)}\n"
                f"for name in {layer_list(layers)}:\n"
                "    lstm = model.get_submodule(name)\n"
                "    h = lstm.hidden_size\n"
                "    for n, b in lstm.named_parameters():\n"
                "        if n.startswith(\"bias_ih\"):\n"
                "            nn.init.zeros_(b); b.data[h:2 * h] = 1.0   # gates i, f, g, o: f is the second\n"
                "        elif n.startswith(\"bias_hh\"):\n"
                "            nn.init.zeros_(b)")

    def bounded(self, layer: LayerInfo) -> str:
        return (f"# the {layer.activation} after {layer.name!r}: bound its input, or grow linearly\n"
                f"x = torch.exp(self.{layer.name}(x))   ->   x = torch.exp(self.{layer.name}(x).clamp(max=20.0))\n"
                f"# or: x = nn.functional.softplus(self.{layer.name}(x))")
