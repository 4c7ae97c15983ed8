"""The detector's checks: one class per finding family behind :class:`~gradwatch.core.checks.base.Check`.

A new check is a new class here and one entry in :data:`DEFAULT_CHECKS` (or a ``checks=`` list given to the
:class:`~gradwatch.core.detector.Detector`); its cut-offs go into :class:`Thresholds` or its documented class
constants.
"""

from gradwatch.core.checks.activations import DeadUnitsCheck, SaturationCheck, ThroughTimeCheck
from gradwatch.core.checks.base import Check, CheckContext, Episode, GradStep, Ledger, Voter
from gradwatch.core.checks.gradient_scale import GradientScaleCheck
from gradwatch.core.checks.loss import LossCheck
from gradwatch.core.checks.nonfinite import LossScaleCheck, NoGradientCheck, NonfiniteCheck
from gradwatch.core.checks.thresholds import Thresholds

__all__ = ["DEFAULT_CHECKS", "Check", "CheckContext", "DeadUnitsCheck", "Episode", "GradStep", "GradientScaleCheck",
           "Ledger", "LossCheck", "LossScaleCheck", "NoGradientCheck", "NonfiniteCheck", "SaturationCheck",
           "ThroughTimeCheck", "Thresholds", "Voter"]

#: The checks a detector runs, in this order on every row.
DEFAULT_CHECKS: tuple[type[Check], ...] = (LossScaleCheck, NonfiniteCheck, NoGradientCheck, GradientScaleCheck,
                                           LossCheck, SaturationCheck, DeadUnitsCheck, ThroughTimeCheck)
