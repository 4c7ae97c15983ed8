"""PyTorch trials: each fix applied mechanically to a fresh model from the user's ``make_model``, trained on the
same batches in the same order with the RNG restored, watched by a silent gradwatch.

Applying a fix is module surgery on the fresh model, never on the user's: activation modules swapped, layers
re-initialised, a layer replaced by ``nn.Sequential(layer, norm)`` (which works whatever holds it: a
``Sequential``, a ``ModuleList``, an attribute), ``nn.RNN`` replaced by ``nn.LSTM`` of the same sizes. What the
model's ``forward`` does with plain functions (``torch.sigmoid(x)``) cannot be rewritten, and such a fix is
reported as not applicable, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwatch.adapters._torch_structure import ACTIVATION_MODULES
from gradwatch.core.report import Recommendation

__all__ = ["Applied", "NotApplicable", "apply_fix", "layer_order"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign)


class NotApplicable(Exception):
    """The fix cannot be applied to this model mechanically; the message says why."""


@dataclass
class Applied:
    """What applying a fix changed: a sentence for the report, and the training-loop changes it needs."""

    change: str
    max_norm: float | None = None  # clip the global gradient norm to this every step
    lr_factor: float | None = None  # divide every param group's learning rate by this
    notes: list[str] = field(default_factory=list)


def layer_order(model: nn.Module, batch: Any) -> list[str]:
    """The names of the leaf modules (and modules with their own parameters) in the order one forward runs
    them, read with forward pre-hooks that are removed at once."""
    order: list[str] = []
    seen: set[str] = set()
    handles = []

    def make(name):
        def pre(module, args):
            if name not in seen:
                seen.add(name)
                order.append(name)
        return pre

    try:
        for name, module in model.named_modules():
            if name and (not any(True for _ in module.children()) or
                         next(module.parameters(recurse=False), None) is not None):
                handles.append(module.register_forward_pre_hook(make(name)))
        was = model.training
        with torch.no_grad():
            model(batch[0])
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return order


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def _layers(model: nn.Module, rec: Recommendation, types: tuple[type, ...], what: str) -> list[tuple[str, Any]]:
    out = []
    modules = dict(model.named_modules())
    for name in rec.layers:
        module = modules.get(name)
        if module is None:
            raise NotApplicable(f"make_model() built no layer named {name!r} (the baseline had one)")
        if not isinstance(module, types):
            raise NotApplicable(f"{name} is a {type(module).__name__}; {what}")
        out.append((name, module))
    return out


def _activation_after(model: nn.Module, order: list[str], name: str) -> tuple[str, nn.Module] | None:
    """The activation module the forward runs right after layer ``name``, or None (a function call, or none)."""
    modules = dict(model.named_modules())
    if name not in order:
        return None
    k = order.index(name)
    nxt = order[k + 1] if k + 1 < len(order) else None
    if nxt is not None and isinstance(modules.get(nxt), ACTIVATION_MODULES):
        return nxt, modules[nxt]
    return None


def _he(layer: nn.Module, nonlinearity: str = "relu") -> None:
    nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


def _swap_activations(model, rec, order, make_new: Callable[[], nn.Module], old: tuple[type, ...]) -> list[str]:
    """Replace the activation module after each named layer; returns the replaced modules' class names."""
    swapped = []
    for name, _ in _layers(model, rec, _WEIGHTED, "trial swaps the activation after Linear and Conv layers"):
        act = _activation_after(model, order, name)
        if act is None:
            raise NotApplicable(f"the activation after {name} is not a module (a function call in forward(), "
                                "such as torch.sigmoid(x)), which trial cannot rewrite; change forward() by hand")
        act_name, act_module = act
        if not isinstance(act_module, old):
            raise NotApplicable(f"the activation after {name} is {type(act_module).__name__}, not one this fix "
                                "replaces")
        swapped.append(type(act_module).__name__)
        _set(model, act_name, make_new())
    return swapped


def _relu(model, rec, order) -> Applied:
    kinds = set(_swap_activations(model, rec, order, nn.ReLU, _SATURATING))
    with torch.no_grad():
        for _, layer in _layers(model, rec, _WEIGHTED, ""):
            _he(layer)
    return Applied(f"nn.{'/'.join(sorted(kinds))} after {_names(rec.layers)} -> nn.ReLU, He init")


def _leaky(model, rec, order) -> Applied:
    _swap_activations(model, rec, order, lambda: nn.LeakyReLU(0.01), (nn.ReLU, nn.ReLU6))
    return Applied(f"nn.ReLU after {_names(rec.layers)} -> nn.LeakyReLU(0.01)")


def _init(model, rec, order, fix: str) -> Applied:
    with torch.no_grad():
        for name, layer in _layers(model, rec, _WEIGHTED, "trial re-initialises Linear and Conv layers"):
            if fix == "he_init":
                _he(layer)
            else:
                act = _activation_after(model, order, name)
                gain_of = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu"}
                gain = nn.init.calculate_gain(gain_of.get(type(act[1]), "linear") if act else "linear")
                nn.init.xavier_uniform_(layer.weight, gain=gain)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    return Applied(f"{'He (kaiming_normal_)' if fix == 'he_init' else 'Xavier (xavier_uniform_)'} init of "
                   f"{_names(rec.layers)}")


def _norm(model, rec, order, fix: str) -> Applied:
    for name, layer in _layers(model, rec, _WEIGHTED, "trial inserts norms after Linear and Conv layers"):
        conv = not isinstance(layer, nn.Linear)
        width = layer.out_channels if conv else layer.out_features
        if fix == "batch_norm":
            norm = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}.get(
                type(layer), nn.BatchNorm1d)(width)
        else:
            norm = nn.GroupNorm(1, width) if conv else nn.LayerNorm(width)
        norm = norm.to(device=layer.weight.device, dtype=layer.weight.dtype)
        _set(model, name, nn.Sequential(layer, norm))
    kind = "BatchNorm" if fix == "batch_norm" else "LayerNorm (GroupNorm(1, C) after convolutions)"
    return Applied(f"{kind} after {_names(rec.layers)}, before their activations")


class _Residual(nn.Module):
    """``x + block(x)``: the skip connection trial wraps around an equal-width layer and its activation."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _skip(model, rec, order) -> Applied:
    wrapped = []
    for name, layer in _layers(model, rec, (nn.Linear,), "trial adds skips around equal-width Linear layers"):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not isinstance(parent, nn.Sequential) or not child.isdigit():
            raise NotApplicable(f"{name} is not in an nn.Sequential; a skip connection around it needs its "
                                "forward() rewritten by hand")
        if layer.in_features != layer.out_features:
            continue  # widths differ: x + block(x) does not add up; the stack's entry and exit layers
        i = int(child)
        act = parent[i + 1] if i + 1 < len(parent) and isinstance(parent[i + 1], ACTIVATION_MODULES) else None
        parent[i] = _Residual(nn.Sequential(layer, act) if act is not None else layer)
        if act is not None:
            parent[i + 1] = nn.Identity()
        wrapped.append(name)
    if not wrapped:
        raise NotApplicable(f"none of {_names(rec.layers)} maps a width to itself, so x + block(x) cannot be formed")
    return Applied(f"x + block(x) around {_names(wrapped)} (each layer with its activation)")


def _gated(model, rec, order) -> Applied:
    for name, rnn in _layers(model, rec, (nn.RNN,), "trial replaces nn.RNN layers"):
        lstm = nn.LSTM(rnn.input_size, rnn.hidden_size, num_layers=rnn.num_layers, bias=rnn.bias,
                       batch_first=rnn.batch_first, dropout=rnn.dropout, bidirectional=rnn.bidirectional)
        _forget_bias_one(lstm)
        _set(model, name, lstm.to(device=rnn.weight_ih_l0.device, dtype=rnn.weight_ih_l0.dtype))
    return Applied(f"nn.RNN {_names(rec.layers)} -> nn.LSTM of the same sizes (forget-gate bias 1)")


def _forget_bias_one(lstm: nn.LSTM) -> None:
    h = lstm.hidden_size
    with torch.no_grad():
        for n, b in lstm.named_parameters():
            if n.startswith("bias_ih"):
                b.zero_()
                b[h:2 * h] = 1.0  # gates i, f, g, o
            elif n.startswith("bias_hh"):
                b.zero_()


def _forget(model, rec, order) -> Applied:
    for _, lstm in _layers(model, rec, (nn.LSTM,), "the forget gate is an LSTM's"):
        _forget_bias_one(lstm)
    return Applied(f"forget-gate bias 1 in {_names(rec.layers)}")


def _clip(model, rec, order) -> Applied:
    max_norm = rec.settings.get("max_norm")
    if not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise NotApplicable("the recommendation carries no clipping norm")
    change = f"clip_grad_norm_(max_norm={max_norm:g}) every step"
    radial = [n for n in rec.settings.get("orthogonal_recurrent", ())]
    if radial:
        with torch.no_grad():
            for name in radial:
                rnn = model.get_submodule(name)
                for n, w in rnn.named_parameters():
                    if n.startswith("weight_hh"):
                        nn.init.orthogonal_(w)
        change += f"; orthogonal recurrent weights in {_names(radial)}"
    return Applied(change, max_norm=float(max_norm))


def _lower_lr(model, rec, order) -> Applied:
    factor = rec.settings.get("factor")
    if not isinstance(factor, (int, float)) or not factor > 1:
        raise NotApplicable("the recommendation carries no learning-rate factor")
    return Applied(f"learning rate / {factor:g}", lr_factor=float(factor))


def _bounded(model, rec, order) -> Applied:
    raise NotApplicable("the unbounded activation is a function call in forward() (torch.exp), which trial cannot "
                        "rewrite; bound its input by hand")


_FIXES: dict[str, Callable[..., Applied]] = {
    "relu": _relu, "leaky_relu": _leaky, "he_init": lambda m, r, o: _init(m, r, o, "he_init"),
    "xavier_init": lambda m, r, o: _init(m, r, o, "xavier_init"),
    "batch_norm": lambda m, r, o: _norm(m, r, o, "batch_norm"),
    "layer_norm": lambda m, r, o: _norm(m, r, o, "layer_norm"),
    "skip_connections": _skip, "gated_rnn": _gated, "forget_gate_bias": _forget, "gradient_clipping": _clip,
    "lower_learning_rate": _lower_lr, "bounded_activation": _bounded,
}


def apply_fix(model: nn.Module, rec: Recommendation, order: list[str]) -> Applied:
    """Apply ``rec`` to ``model`` in place; :class:`NotApplicable` when it cannot be done mechanically."""
    fix = _FIXES.get(rec.fix)
    if fix is None:
        raise NotApplicable(f"trial has no mechanical form of {rec.fix!r}")
    return fix(model, rec, order)


def batch_iterator(batches: Iterable | Callable[[], Any]):
    """A fresh iterator over the user's batches: ``batches()`` for a callable, ``iter(batches)`` otherwise."""
    return iter(batches()) if callable(batches) else iter(batches)


def _names(names) -> str:
    names = list(names)
    return ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
