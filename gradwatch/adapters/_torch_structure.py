"""Reads a PyTorch model's structure for the recommender.

torch.fx sees what modules alone cannot: functional activations inside ``forward`` (``torch.tanh``,
``F.relu``) and additions that join an earlier tensor (skip connections). Where the model does not trace
(data-dependent control flow), the order in which modules ran during the first forward is used instead,
and the report says that functional activations and skips may have been missed.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx, nn

from gradwatch.core.structure import LayerInfo, Structure

__all__ = ["ACTIVATION_MODULES", "classify", "read_structure"]

_ACT_BY_MODULE: dict[type, str] = {
    nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu", nn.RReLU: "rrelu", nn.ReLU6: "relu6",
    nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "mish",
    nn.Softplus: "softplus", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardtanh: "hardtanh",
    nn.Hardsigmoid: "hardsigmoid", nn.Softsign: "softsign",
}
ACTIVATION_MODULES = tuple(_ACT_BY_MODULE)

_F = nn.functional
_ACT_BY_FUNCTION: dict[Any, str] = {
    torch.relu: "relu", _F.relu: "relu", torch.relu_: "relu", _F.relu6: "relu6", _F.leaky_relu: "leaky_relu",
    _F.elu: "elu", _F.selu: "selu", torch.selu: "selu", _F.celu: "celu", _F.gelu: "gelu", _F.silu: "silu",
    _F.mish: "mish", _F.softplus: "softplus", torch.sigmoid: "sigmoid", _F.sigmoid: "sigmoid",
    torch.tanh: "tanh", _F.tanh: "tanh", _F.hardtanh: "hardtanh", _F.hardsigmoid: "hardsigmoid", torch.exp: "exp",
    _F.softsign: "softsign", _F.prelu: "prelu",
}
_ACT_BY_METHOD = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "exp": "exp",
                  "exp_": "exp",
                  "tanh": "tanh", "tanh_": "tanh"}

_NORM = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm,
         nn.LocalResponseNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
_TRANSPARENT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten,
                        nn.Unflatten, nn.Identity, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                        nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_TRANSPARENT_CALLS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                      "dropout", "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool2d",
                      "getitem", "float", "to", "type_as"}
_ADDS = {operator.add, operator.iadd, torch.add}
# Library blocks that hold skip connections inside modules fx may not trace into.
_RESIDUAL_BLOCKS = {"TransformerEncoderLayer": 2, "TransformerDecoderLayer": 3, "BasicBlock": 1, "Bottleneck": 1}


def is_norm(module: nn.Module | None) -> bool:
    """A normalization layer: a torch one, or a library's own (``LlamaRMSNorm``, ``T5LayerNorm``) recognised by
    a class name ending in ``Norm`` and only 1-D parameters (gains and shifts)."""
    if module is None:
        return False
    if isinstance(module, _NORM):
        return True
    return type(module).__name__.endswith("Norm") and all(p.dim() <= 1 for p in module.parameters(recurse=False))


def classify(module: nn.Module) -> str:
    """The coarse kind of a parameter-owning module."""
    if is_norm(module):
        return "norm"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return "recurrent"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return "dense"
    if any(p.dim() >= 2 for p in module.parameters(recurse=False)):
        return "dense"
    return "other"


def _main_weight(module: nn.Module) -> torch.Tensor | None:
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() >= 2:
        return w
    for name in ("weight_ih_l0", "in_proj_weight"):
        w = getattr(module, name, None)
        if isinstance(w, torch.Tensor):
            return w
    for p in module.parameters(recurse=False):
        if p.dim() >= 2:
            return p
    return None


def _fans(module: nn.Module, w: torch.Tensor | None) -> tuple[int, int]:
    if w is None or w.dim() < 2 or isinstance(w, nn.parameter.UninitializedParameter):
        return 0, 0
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return 1, int(w.shape[1])
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
    return int(fan_in), int(fan_out)


def _recurrent(module: nn.Module) -> tuple[str | None, float | None, str | None]:
    if isinstance(module, nn.LSTM):
        return "lstm", None, None
    if isinstance(module, nn.GRU):
        return "gru", None, None
    if isinstance(module, nn.RNN):
        nl = module.nonlinearity
        w = module.weight_hh_l0.detach()
        radius = None
        if w.shape[0] <= 1024:
            radius = float(torch.linalg.eigvals(w.float().cpu()).abs().max())
        return f"rnn_{nl}", radius, nl
    return None, None, None


class _Tracer(fx.Tracer):
    """Keeps parameter-owning and childless modules as leaves, traces into containers and custom blocks."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if next(m.parameters(recurse=False), None) is not None:
            return True
        if not any(True for _ in m.children()):
            return True
        return super().is_leaf_module(m, qualname) and not isinstance(m, (nn.Sequential, nn.ModuleList))


def _trace(root: nn.Module) -> fx.Graph | None:
    """The model's graph, or ``None`` when it does not trace. Tracing runs ``forward`` on proxies, so whatever a
    forward stores on its modules (a recurrent model's hidden state, a running statistic) is put back as it was."""
    saved = [(m, dict(m.__dict__)) for m in root.modules()]
    try:
        return _Tracer().trace(root)
    except Exception:  # noqa: BLE001 - any model that does not trace falls back to module order
        return None
    finally:
        for module, attrs in saved:
            module.__dict__.clear()
            module.__dict__.update(attrs)


def _activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return _ACT_BY_MODULE.get(type(modules.get(node.target)))
    if node.op == "call_function":
        return _ACT_BY_FUNCTION.get(node.target)
    if node.op == "call_method":
        return _ACT_BY_METHOD.get(node.target)
    return None


def _is_transparent(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _TRANSPARENT_MODULES)
    name = getattr(node.target, "__name__", str(node.target))
    return node.op in ("call_function", "call_method") and name in _TRANSPARENT_CALLS


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return True
    return node.op == "call_method" and node.target in ("add", "add_")


def _from_graph(graph: fx.Graph, modules: dict[str, nn.Module], layer_names: set[str]):
    nodes = list(graph.nodes)
    # layer -> (activation, where it was seen, feeder module, normalized)
    follows: dict[str, tuple[str | None, str | None, str, bool]] = {}
    for node in nodes:
        if node.op != "call_module" or node.target not in layer_names:
            continue
        if is_norm(modules[node.target]):
            continue
        feeder, act, normalized, cur = node.target, None, False, node
        for _ in range(8):
            users = list(cur.users)
            if len(users) != 1:
                break
            nxt = users[0]
            act = _activation_of(nxt, modules)
            if act is not None:
                break
            if nxt.op == "call_module" and is_norm(modules.get(nxt.target)):
                normalized, feeder = True, nxt.target
            elif not _is_transparent(nxt, modules):
                break
            cur = nxt
        source = None if act is None else "module" if nxt.op == "call_module" else "functional"
        follows.setdefault(node.target, (act, source, feeder, normalized))

    ancestors: dict[fx.Node, set[fx.Node]] = {}
    for node in nodes:
        acc: set[fx.Node] = set()
        for arg in node.all_input_nodes:
            acc.add(arg)
            acc |= ancestors[arg]
        ancestors[node] = acc
    residual_adds = 0
    in_branch: set[str] = set()
    for node in nodes:
        if not _is_add(node):
            continue
        args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(args) != 2:
            continue
        a, b = args
        if a in ancestors[b]:
            early, late = a, b
        elif b in ancestors[a]:
            early, late = b, a
        else:
            continue
        residual_adds += 1
        for n in ancestors[late] | {late}:
            if early in ancestors[n] and n.op == "call_module" and n.target in layer_names:
                in_branch.add(n.target)
    # Library blocks kept whole as leaves hold skips the graph cannot show.
    residual_adds += sum(_RESIDUAL_BLOCKS.get(type(modules[n.target]).__name__, 0)
                         for n in nodes if n.op == "call_module")
    return follows, residual_adds, in_branch


def _from_module_order(exec_order: list[str], modules: dict[str, nn.Module], layer_names: set[str]):
    follows: dict[str, tuple[str | None, str | None, str, bool]] = {}
    for k, name in enumerate(exec_order):
        if name not in layer_names or is_norm(modules[name]):
            continue
        act, feeder, normalized = None, name, False
        for nxt in exec_order[k + 1:k + 6]:
            m = modules[nxt]
            if type(m) in _ACT_BY_MODULE:
                act = _ACT_BY_MODULE[type(m)]
                break
            if is_norm(m):
                normalized, feeder = True, nxt
                continue
            if isinstance(m, _TRANSPARENT_MODULES):
                continue
            break
        follows[name] = (act, None if act is None else "module", feeder, normalized)
    residual = sum(_RESIDUAL_BLOCKS.get(type(m).__name__, 0) for m in modules.values())
    return follows, residual


def read_structure(root: nn.Module, order: list[str], exec_order: list[str]) -> tuple[Structure, dict[str, str]]:
    """The model's :class:`Structure` for the layers in ``order``, and for each layer the module whose output
    feeds its activation (the layer itself, or the normalization layer after it).

    Args:
        root: The model.
        order: Parameter-owning module names in execution order (the parameter table's layers).
        exec_order: Every module in the order it ran during the first forward (may be empty).
    """
    modules = dict(root.named_modules())
    layer_set = set(order)
    notes: list[str] = []
    graph = _trace(root)
    if graph is not None:
        follows, residual, in_branch = _from_graph(graph, modules, layer_set)
    else:
        follows, residual = _from_module_order(exec_order, modules, layer_set)
        in_branch = set()
        notes.append(f"{type(root).__name__} does not trace with torch.fx; activations were read from modules "
                     "only, so functional ones (torch.tanh, F.relu) and skip connections may be missed.")
    layers = []
    for idx, name in enumerate(order):
        module = modules[name]
        kind = classify(module)
        w = _main_weight(module)
        fan_in, fan_out = _fans(module, w)
        act, act_source, _feeder, normalized = follows.get(name, (None, None, name, False))
        cell, radius, rnn_act = _recurrent(module)
        if rnn_act is not None:
            act, act_source = rnn_act, "argument"  # nn.RNN(nonlinearity=...)
        std = float(w.detach().float().std()) if w is not None and w.numel() > 1 and not isinstance(
            w, nn.parameter.UninitializedParameter) else None
        layers.append(LayerInfo(
            name=name or "(root)", type=type(module).__name__, kind=kind, index=idx, fan_in=fan_in,
            fan_out=fan_out, activation=act, activation_source=act_source,
            weight_std=None if std is None or math.isnan(std) else std, normalized=normalized,
            recurrent_cell=cell, recurrent_radius=radius))
    norm_layers = tuple(n for n, m in modules.items() if n and is_norm(m))
    feeders = {name: follows.get(name, (None, None, name, False))[2] for name in order}
    return Structure(framework="torch", model_type=type(root).__name__, layers=tuple(layers),
                     norm_layers=norm_layers, residual_adds=residual, residual_layers=tuple(
                         n for n in order if n in in_branch), traced=graph is not None,
                     notes=tuple(notes)), feeders
