"""The words gradwatch's results are written in: finding kinds, fixes, severities and layer states.

The ground floor of the package: every other module may import this one, and it imports nothing of gradwatch.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["HEALTH_KINDS", "FindingKind", "Fix", "LayerStatus", "Severity"]

FindingKind = Literal["vanishing", "exploding", "nonfinite", "no_gradient", "saturation", "dead_units"]
Severity = Literal["info", "warning", "critical"]
Fix = Literal["relu", "he_init", "xavier_init", "batch_norm", "layer_norm", "skip_connections",
              "gradient_clipping", "lower_learning_rate", "gated_rnn", "leaky_relu", "forget_gate_bias",
              "bounded_activation"]
LayerStatus = Literal["ok", "vanishing", "exploding", "nonfinite", "no_gradient", "frozen", "no_grad"]

#: Finding kinds that make a report unhealthy: the gradient cannot train the model as it is.
HEALTH_KINDS = frozenset({"vanishing", "exploding", "nonfinite", "no_gradient"})
