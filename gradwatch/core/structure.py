"""A framework-neutral description of a model's structure, produced by the adapters, read by the detector
and the recommender.

The adapter says what it saw: the layers in execution order, what kind each is, its fan-in and fan-out, the
activation that follows it (module or functional), the spread of its initial weights, normalization layers,
additions that join an earlier tensor (skip connections) and recurrent cells.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from gradwatch.core.stats import PROFILE_KINDS

__all__ = [
    "ACTIVATION_GAIN",
    "UNBOUNDED",
    "adaptive_optimizer",
    "role_of",
    "LayerInfo",
    "LayerKind",
    "Structure",
    "he_std",
    "xavier_std",
]

LayerKind = Literal["dense", "conv", "recurrent", "attention", "embedding", "norm", "other"]


#: Activations that saturate (derivative near zero for large inputs).
SATURATING = frozenset({"sigmoid", "tanh", "hardsigmoid", "hardtanh", "softsign"})

#: Activations without an upper bound that grow faster than their input: their output overflows float32 once the
#: input passes log(float max), about 88.7 (11.1 in float16). The adapters watch their inputs for it every step.
UNBOUNDED = frozenset({"exp"})

#: Activations of the ReLU family, for which He initialization is the matching scale.
RELU_FAMILY = frozenset({"relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "mish", "relu6",
                         "softplus", "celu", "rrelu"})

#: Recommended gain per activation (torch.nn.init.calculate_gain; He et al. 2015 for ReLU).
ACTIVATION_GAIN = {"relu": math.sqrt(2.0), "leaky_relu": math.sqrt(2.0 / (1 + 0.01 ** 2)), "tanh": 5.0 / 3,
                   "sigmoid": 1.0, "selu": 0.75, "linear": 1.0, "gelu": math.sqrt(2.0), "silu": math.sqrt(2.0),
                   "elu": math.sqrt(2.0)}


#: Optimizers that rescale each gradient coordinate by its own running size (Adam and kin, RMSprop, Adagrad, ...):
#: under them a small gradient is not a small update (Kingma & Ba 2015, section 2.1), so "not learning" is judged
#: by the update ratio. Sign-based optimizers (Lion) are scale-invariant too.
_ADAPTIVE = ("adam", "rmsprop", "adagrad", "adadelta", "adafactor", "lion", "lamb", "sophia", "shampoo", "muon")


def adaptive_optimizer(name: str | None) -> bool:
    """Whether an optimizer class name is one that rescales gradients per coordinate.

    Example:
        >>> adaptive_optimizer("AdamW"), adaptive_optimizer("SGD"), adaptive_optimizer(None)
        (True, False, False)
    """
    return bool(name) and any(key in name.lower() for key in _ADAPTIVE)


def role_of(name: str) -> str:
    """A layer's role: its name with every run of digits replaced by ``#``, so the same layer in every block of a
    stack shares one role (``encoder.layer.#.attention.self.query``) and is compared with its peers.

    Example:
        >>> role_of("bert.encoder.layer.11.attention.self.query"), role_of("3"), role_of("head")
        ('bert.encoder.layer.#.attention.self.query', '#', 'head')
    """
    return re.sub(r"\d+", "#", name)


def he_std(fan_in: int) -> float:
    """He et al. 2015 scale for a ReLU-family layer: ``sqrt(2 / fan_in)``.

    Example:
        >>> round(he_std(200), 4)
        0.1
    """
    return math.sqrt(2.0 / fan_in) if fan_in > 0 else float("nan")


def xavier_std(fan_in: int, fan_out: int) -> float:
    """Glorot & Bengio 2010 scale for a tanh/sigmoid layer: ``sqrt(2 / (fan_in + fan_out))``.

    Example:
        >>> round(xavier_std(100, 100), 4)
        0.1
    """
    return math.sqrt(2.0 / (fan_in + fan_out)) if fan_in + fan_out > 0 else float("nan")


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerInfo:
    """One layer (a module or Keras layer that owns parameters), in execution order.

    Args:
        name: The user's own name (``named_modules()`` path, or Keras ``layer.name``).
        type: Class name, e.g. ``"Linear"``.
        kind: Coarse kind, see :data:`LayerKind`.
        index: Position in execution order, ``0`` nearest the input.
        fan_in: Inputs per output unit (times the receptive field for convolutions). ``0`` if unknown.
        fan_out: Outputs per input unit (times the receptive field). ``0`` if unknown.
        activation: The activation applied to this layer's output before the next weight layer
            (``"relu"``, ``"sigmoid"``, ``"tanh"``, ...), ``None`` when none was seen.
        activation_source: Where the activation was seen: ``"module"``, ``"functional"``, ``"argument"``
            (Keras ``activation=``) or ``None``.
        weight_std: Standard deviation of the main weight when the structure was read.
        normalized: Whether a normalization layer follows before the next weight layer.
        recurrent_cell: ``"rnn_tanh"``, ``"rnn_relu"``, ``"lstm"`` or ``"gru"`` for recurrent layers.
        recurrent_radius: Spectral radius of the hidden-to-hidden weight (first layer of a stacked RNN).
        initializer: The configured initializer name where the framework records one (Keras).
    """

    name: str
    type: str
    kind: LayerKind = "other"
    index: int = 0
    fan_in: int = 0
    fan_out: int = 0
    activation: str | None = None
    activation_source: str | None = None
    weight_std: float | None = None
    normalized: bool = False
    recurrent_cell: str | None = None
    recurrent_radius: float | None = None
    initializer: str | None = None

    @property
    def profile(self) -> bool:
        """Whether this layer's gradient takes part in the depth profile."""
        return self.kind in PROFILE_KINDS

    @property
    def he_std(self) -> float:
        return he_std(self.fan_in)

    @property
    def xavier_std(self) -> float:
        return xavier_std(self.fan_in, self.fan_out)

    @property
    def target_std(self) -> float:
        """The initial weight spread this layer's activation calls for (He for ReLU-family, else Xavier)."""
        if self.activation in RELU_FAMILY:
            return self.he_std
        return self.xavier_std


@dataclass(frozen=True, slots=True, kw_only=True)
class Structure:
    """What the adapter learned of the model's structure.

    Args:
        framework: ``"torch"`` or ``"keras"``.
        model_type: The model's class name.
        layers: Parameter-owning layers in execution order.
        norm_layers: Names of normalization layers (BatchNorm, LayerNorm, GroupNorm, ...).
        residual_adds: Number of additions that join a tensor from earlier in the network (skip connections).
        residual_layers: Names of layers inside a residual branch, where known.
        traced: Whether the functional graph was read (torch.fx or the Keras graph); ``False`` means only
            modules were seen, so functional activations and skip connections may be missing.
        notes: Anything the adapter could not read, for the report.
        optimizer: The optimizer's class name, where known.
        adaptive_optimizer: Whether that optimizer rescales gradients per coordinate (Adam, RMSprop, ...).
    """

    framework: str
    model_type: str
    layers: tuple[LayerInfo, ...]
    norm_layers: tuple[str, ...] = ()
    residual_adds: int = 0
    residual_layers: tuple[str, ...] = ()
    traced: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    optimizer: str | None = None
    adaptive_optimizer: bool = False

    @property
    def depth(self) -> int:
        """Weight layers on the path from input to output (dense, conv, recurrent, attention)."""
        return sum(1 for layer in self.layers if layer.profile)

    @property
    def has_norm(self) -> bool:
        return bool(self.norm_layers)

    @property
    def has_residual(self) -> bool:
        return self.residual_adds > 0

    @property
    def recurrent(self) -> tuple[LayerInfo, ...]:
        return tuple(layer for layer in self.layers if layer.kind == "recurrent")

    def layer(self, name: str) -> LayerInfo | None:
        for layer in self.layers:
            if layer.name == name:
                return layer
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Structure:
        d = dict(d)
        d["layers"] = tuple(LayerInfo(**layer) for layer in d.get("layers", ()))
        for key in ("norm_layers", "residual_layers", "notes"):
            d[key] = tuple(d.get(key, ()))
        return cls(**d)
