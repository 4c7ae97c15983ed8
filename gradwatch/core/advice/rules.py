"""The recommendation rules, one class per fix (a fix with two distinct causes has two rules)."""

from __future__ import annotations

import math

from gradwatch.core.advice.base import Candidate, Context, Priority, Rule, finding_evidence
from gradwatch.core.report import Finding, LayerSummary, Recommendation
from gradwatch.core.stats import TYPICAL_UPDATE_RATIO
from gradwatch.core.structure import RELU_FAMILY, SATURATING, UNBOUNDED

__all__ = ["DEFAULT_RULES", "REFERENCES"]

REFERENCES = {
    "relu": ("Glorot, Bordes & Bengio 2011, Deep Sparse Rectifier Neural Networks (AISTATS)",
             "Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward neural networks"),
    "he_init": ("He et al. 2015, Delving Deep into Rectifiers, arXiv:1502.01852",),
    "xavier_init": ("Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward neural "
                    "networks (AISTATS)",),
    "batch_norm": ("Ioffe & Szegedy 2015, Batch Normalization, arXiv:1502.03167",),
    "layer_norm": ("Ba, Kiros & Hinton 2016, Layer Normalization, arXiv:1607.06450",
                   "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture, arXiv:2002.04745"),
    "skip_connections": ("He et al. 2016, Deep Residual Learning for Image Recognition, arXiv:1512.03385",),
    "gradient_clipping": ("Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural "
                          "networks, arXiv:1211.5063",),
    "lower_learning_rate": ("Bengio 2012, Practical recommendations for gradient-based training of deep "
                            "architectures, arXiv:1206.5533",),
    "gated_rnn": ("Hochreiter & Schmidhuber 1997, Long Short-Term Memory (Neural Computation)",
                  "Bengio, Simard & Frasconi 1994, Learning long-term dependencies with gradient descent is "
                  "difficult (IEEE TNN)", "Cho et al. 2014, GRU, arXiv:1406.1078"),
    "leaky_relu": ("Maas, Hannun & Ng 2013, Rectifier Nonlinearities Improve Neural Network Acoustic Models",
                   "Lu et al. 2019, Dying ReLU and Initialization, arXiv:1903.06733"),
    "bounded_activation": ("Goodfellow, Bengio & Courville 2016, Deep Learning, section 4.1 (overflow and "
                           "underflow; evaluating exp and softmax stably)",),
    "forget_gate_bias": ("Gers, Schmidhuber & Cummins 2000, Learning to Forget: Continual Prediction with LSTM "
                         "(Neural Computation)",
                         "Jozefowicz, Zaremba & Sutskever 2015, An Empirical Exploration of Recurrent Network "
                         "Architectures (ICML)"),
}

#: Plain stacks at least this deep get normalization / skip-connection advice when gradients decay with depth.
DEEP = 6
#: A saturating layer with more than this fraction of its units saturated ranks ``relu`` higher.
SATURATED_FRACTION = 0.3
#: Saturation worth quoting in the reason.
SHOWN_SATURATION = 0.1
#: A recurrent layer whose spectral radius exceeds this also gets an orthogonal re-initialisation.
AMPLIFYING_RADIUS = 1.05
#: Activations with slope 1 at 0 (zero-centred): at the Xavier scale a deep stack of them keeps its gradient, so
#: when such a stack starts too small, the init is the cause, not the activation (Glorot & Bengio 2010).
UNIT_SLOPE = frozenset({"tanh", "hardtanh", "softsign"})
#: The learning-rate factor is a power of ten between 10 and this.
MAX_LR_FACTOR_DECADES = 3


def _rec(fix: str, priority: int, layers, reason: str, snippet: str, addresses: tuple[str, ...],
         **settings) -> Candidate:
    return Candidate(priority, Recommendation(fix=fix, layers=tuple(layers), reason=reason, snippet=snippet,
                                              references=REFERENCES[fix], addresses=addresses, settings=settings))


class ReluRule(Rule):
    """Saturating activations (sigmoid/tanh) in hidden layers with vanishing gradients or saturation."""

    fix = "relu"

    def propose(self, ctx: Context) -> Candidate | None:
        van, saturation = ctx.vanishing, ctx.saturation
        sat_layers = [la for la in ctx.hidden if la.activation in SATURATING and la.kind != "recurrent"]
        if not (van or saturation) or not sat_layers:
            return None
        sat_vals = {la.name: ctx.by_name[la.name].saturation for la in sat_layers if la.name in ctx.by_name}
        measured = {k: v for k, v in sat_vals.items() if math.isfinite(v)}
        acts = sorted({la.activation for la in sat_layers})
        ev = finding_evidence(van[0]) if van else saturation[0].message
        why = f"{ev} {len(sat_layers)} hidden layer(s) feed {'/'.join(acts)}, whose derivative is at most " + \
              ("0.25" if acts == ["sigmoid"] else "1 and near 0 once saturated") + \
              ", so the gradient shrinks at every layer on the way back"
        if measured:
            worst = max(measured, key=measured.get)
            if measured[worst] >= SHOWN_SATURATION:
                why += f"; {measured[worst]:.0%} of {worst}'s units are saturated"
            else:
                why += (f" (units are not saturated, at most {measured[worst]:.0%}: the loss comes from the "
                        "activation's small slope itself)")
        saturated = measured and max(measured.values()) > SATURATED_FRACTION
        return _rec("relu", Priority.RELU_SATURATED if saturated else Priority.RELU, [la.name for la in sat_layers],
                    why + ".", ctx.snippets.relu(sat_layers), ("vanishing", "saturation"))


def _time_gap(f: Finding) -> float:
    """The largest fade through time a finding measured, in orders of magnitude."""
    return max(f.evidence.get("time_decades", {}).values(), default=float("nan"))


class GatedRnnRule(Rule):
    """A plain RNN cell whose gradient vanishes through time."""

    fix = "gated_rnn"

    def propose(self, ctx: Context) -> Candidate | None:
        plain_rnn = [la for la in ctx.structure.recurrent if (la.recurrent_cell or "").startswith("rnn")]
        if not ctx.vanishing_time or not plain_rnn:
            return None
        f = ctx.vanishing_time[0]
        d = _time_gap(f)
        names = ", ".join(la.name for la in plain_rnn)
        return _rec("gated_rnn", Priority.GATED_RNN, [la.name for la in plain_rnn],
                    f"The gradient reaching the first time steps is {d:.1f} orders of magnitude below the last "
                    f"step's in {names}, a plain {plain_rnn[0].type} ({plain_rnn[0].recurrent_cell}): its gradient "
                    "through time is a product of Jacobians that shrinks geometrically. A gated cell (LSTM/GRU) "
                    "carries it through an additive memory path.",
                    ctx.snippets.gated(plain_rnn), ("vanishing",))


class BoundedActivationRule(Rule):
    """Non-finite values born in the forward pass at an unbounded activation (``exp``): the activation is the cause,
    whatever the step size; bound its input or use a function that grows linearly."""

    fix = "bounded_activation"

    def propose(self, ctx: Context) -> Candidate | None:
        for f in ctx.nonfinite:
            origin = f.evidence.get("forward_origin_layer")
            layer = ctx.structure.layer(origin) if origin else None
            if layer is None or layer.activation not in UNBOUNDED:
                continue
            step = f.evidence.get("forward_origin_step", f.step)
            return _rec("bounded_activation", Priority.FORWARD_OVERFLOW, [layer.name],
                        f"The forward pass overflowed at step {step}: the input of the {layer.activation} after "
                        f"{layer.name} passed log(float max) (about 88.7 in float32), so it returned inf and every "
                        "gradient after it turned non-finite. The activation is the cause: a lower learning rate "
                        "only delays it. Bound its input, or use softplus, which grows linearly.",
                        ctx.snippets.bounded(layer), ("nonfinite", "exploding"))
        return None


class ForgetGateBiasRule(Rule):
    """An LSTM whose gradient vanishes through time: start its forget gates open (bias 1)."""

    fix = "forget_gate_bias"

    def propose(self, ctx: Context) -> Candidate | None:
        lstm = [la for la in ctx.structure.recurrent if la.recurrent_cell == "lstm"]
        if not ctx.vanishing_time or not lstm:
            return None
        f = ctx.vanishing_time[0]
        named = [la for la in lstm if la.name in f.layers] or lstm
        d = _time_gap(f)
        names = ", ".join(la.name for la in named)
        return _rec("forget_gate_bias", Priority.GATED_RNN, [la.name for la in named],
                    f"The gradient reaching the first time steps is {d:.1f} orders of magnitude below the last "
                    f"step's in {names}, an LSTM: with forget-gate bias 0 each step keeps about half of the cell "
                    "state, so the memory path fades geometrically until the gates learn to stay open. A forget-gate "
                    "bias of 1 starts them open (Gers et al. 2000; Jozefowicz et al. 2015).",
                    ctx.snippets.forget_bias(named), ("vanishing",))


class RecurrentClippingRule(Rule):
    """A recurrent model whose gradient explodes through time, or whose gradients explode or turn non-finite."""

    fix = "gradient_clipping"

    def propose(self, ctx: Context) -> Candidate | None:
        rnn_layers = list(ctx.structure.recurrent)
        if not rnn_layers:
            return None
        names = ", ".join(la.name for la in rnn_layers)
        if ctx.exploding_time:
            f = ctx.exploding_time[0]
            d = max((-v for v in f.evidence.get("time_decades", {}).values()), default=float("nan"))
            radius = [la.recurrent_radius for la in rnn_layers if la.recurrent_radius]
            reason = (f"The gradient grows {d:.1f} orders of magnitude from the last time step back to the first "
                      f"in {names}")
            if radius:
                reason += f"; the recurrent weight's spectral radius is {max(radius):.2f} (> 1 amplifies)"
            if any(r > AMPLIFYING_RADIUS for r in radius):
                reason += ", so also start it orthogonal (radius 1): clipping bounds the step, not the growth"
        elif ctx.exploding or ctx.nonfinite:
            reason = (f"{finding_evidence((ctx.exploding or ctx.nonfinite)[0])} The model is recurrent "
                      f"({names}), where gradients through time can blow up")
        else:
            return None
        trigger = (ctx.exploding_time or ctx.exploding or ctx.nonfinite)[0]
        max_norm = clip_norm(ctx.layers, trigger)
        # An explosion that came first (and saturated the cell into vanishing) is the one to fix first.
        first = bool(ctx.exploding_time) and (not ctx.vanishing_time
                                              or ctx.exploding_time[0].step <= ctx.vanishing_time[0].step)
        reason += (f". Clip the global gradient norm near its healthy level (~{max_norm:g})." if trigger.step > 1 else
                   f". It explodes from the first step, so clip the global gradient norm at the usual starting value, "
                   f"{max_norm:g}.")
        amplifying = [la for la in rnn_layers if (la.recurrent_radius or 0) > AMPLIFYING_RADIUS]
        return _rec("gradient_clipping", Priority.EXPLOSION_THROUGH_TIME_FIRST if first else Priority.CLIP_RECURRENT,
                    [la.name for la in rnn_layers], reason, ctx.snippets.clip(max_norm, amplifying),
                    ("exploding", "nonfinite"), max_norm=float(max_norm),
                    orthogonal_recurrent=tuple(la.name for la in amplifying))


class InitScaleRule(Rule):
    """Initial weights off their activation's He/Xavier scale, compounded over the depth, in the direction of the
    finding (too small with vanishing or dead units, too large with exploding or non-finite)."""

    fix = "he_init"  # or xavier_init, by the activations the mismatched layers feed

    def propose(self, ctx: Context) -> Candidate | None:
        van, exp, nonfinite, dead = ctx.vanishing, ctx.exploding, ctx.nonfinite, ctx.dead
        if ctx.init_mismatch is None or not (van or exp or nonfinite or dead):
            return None
        ratio, mism = ctx.init_mismatch
        too_small = ratio < 1
        fam = "he_init" if any(la.activation in RELU_FAMILY for la in mism) or not any(
            la.activation in SATURATING for la in mism) else "xavier_init"
        relevant = (too_small and (van or dead)) or (not too_small and (exp or nonfinite))
        # He init is for the layers feeding a ReLU-family activation, Xavier for the others that feed one; an
        # output layer (no activation after it) keeps its own init.
        mism = [la for la in mism if la.activation is not None
                and (la.activation in RELU_FAMILY) == (fam == "he_init")]
        if not relevant or not mism:
            return None
        target = "He (sqrt(2/fan_in))" if fam == "he_init" else "Xavier/Glorot (sqrt(2/(fan_in+fan_out)))"
        first = mism[0]
        depth = len(ctx.weight_layers)
        reason = (f"{finding_evidence((van or exp or nonfinite or dead)[0])} Initial weight spread is {ratio:.2f}x the "
                  f"{target} scale for the {first.activation or 'linear'} activations (e.g. {first.name}: std "
                  f"{first.weight_std:.3g} vs {first.target_std:.3g}); over {depth} layers that "
                  f"compounds to about {ratio ** depth:.2g}x in the signal and gradient.")
        sat_layers = [la for la in ctx.hidden if la.activation in SATURATING and la.kind != "recurrent"]
        if fam == "xavier_init" and too_small and all(la.activation in UNIT_SLOPE for la in mism):
            priority = Priority.XAVIER_INIT_TANH
        elif fam == "he_init" and not sat_layers:
            priority = Priority.HE_INIT
        else:
            priority = Priority.INIT
        return _rec(fam, priority, [la.name for la in mism], reason, ctx.snippets.init(fam, mism),
                    ("vanishing", "exploding") if not dead else ("dead_units",))


def _plain_targets(ctx: Context):
    return [la for la in ctx.hidden if la.kind in ("dense", "conv")]


class NormalizationRule(Rule):
    """A deep stack with no normalization layer whose gradients vanish or explode across layers."""

    fix = "batch_norm"  # layer_norm for sequence models

    def propose(self, ctx: Context) -> Candidate | None:
        profile_finding = ctx.vanishing or ctx.exploding
        depth = ctx.structure.depth
        if not profile_finding or depth < DEEP or ctx.structure.has_norm:
            return None
        sequence = any(la.kind in ("recurrent", "attention", "embedding") for la in ctx.structure.layers)
        fix = "layer_norm" if sequence else "batch_norm"
        targets = _plain_targets(ctx)
        if not targets:
            return None
        return _rec(fix, Priority.NORMALIZATION, [la.name for la in targets],
                    f"{finding_evidence(profile_finding[0])} The model is {depth} weight layers deep with no "
                    "normalization layer, so nothing re-centres and re-scales activations between layers.",
                    ctx.snippets.norm(fix, targets), ("vanishing", "exploding"))


class SkipConnectionsRule(Rule):
    """A deep plain stack (no skip connection) whose gradients vanish across layers."""

    fix = "skip_connections"

    def propose(self, ctx: Context) -> Candidate | None:
        depth = ctx.structure.depth
        if not ctx.vanishing or depth < DEEP or ctx.structure.has_residual:
            return None
        targets = _plain_targets(ctx)
        if not targets:
            return None
        return _rec("skip_connections", Priority.SKIP_CONNECTIONS, [la.name for la in targets],
                    f"{finding_evidence(ctx.vanishing[0])} The network is a plain stack of {depth} weight layers "
                    "with no skip connection: every gradient must pass through every layer's Jacobian. Residual "
                    "additions give it an identity path.",
                    ctx.snippets.skip(targets), ("vanishing",))


class LowerLearningRateRule(Rule):
    """Exploding or non-finite gradients (not through time) with an init within range: the step size."""

    fix = "lower_learning_rate"

    def propose(self, ctx: Context) -> Candidate | None:
        if not (ctx.exploding or ctx.nonfinite) or ctx.exploding_time:
            return None
        if ctx.init_mismatch is not None and ctx.init_mismatch[0] > 1:
            return None
        f = (ctx.exploding or ctx.nonfinite)[0]
        peaks = sorted(u for u in (_peak_update_ratio(la) for la in ctx.layers) if math.isfinite(u))
        ur = peaks[len(peaks) // 2] if peaks else float("nan")  # the typical layer, not the one outlier
        if math.isfinite(ur) and ur > TYPICAL_UPDATE_RATIO:
            factor = lr_factor(ur)
            basis = (f"the median layer's update ratio ||dw||/||w|| reached {ur:.2g} per step, against "
                     f"~{TYPICAL_UPDATE_RATIO:g} for steady training")
        else:
            factor = 10
            basis = "updates diverge before the update ratio settles"
        reason = (f"{finding_evidence(f)} The initialization is within range of its activations' scale, so the step "
                  f"size is the likely cause: {basis}. Lower the learning rate about {factor:g}x.")
        priority = Priority.LOWER_LEARNING_RATE_RECURRENT if ctx.structure.recurrent else Priority.LOWER_LEARNING_RATE
        return _rec("lower_learning_rate", priority, f.layers, reason, ctx.snippets.lr(factor),
                    ("exploding", "nonfinite"), factor=float(factor))


class ClippingBoundRule(Rule):
    """Exploding or non-finite gradients in a non-recurrent model: clipping bounds each step meanwhile."""

    fix = "gradient_clipping"

    def propose(self, ctx: Context) -> Candidate | None:
        if not (ctx.exploding or ctx.nonfinite) or ctx.exploding_time or ctx.structure.recurrent:
            return None
        f = (ctx.exploding or ctx.nonfinite)[0]
        max_norm = clip_norm(ctx.layers, f)
        return _rec("gradient_clipping", Priority.CLIP_BOUND, f.layers,
                    f"{finding_evidence(f)} Clipping the global gradient norm (~{max_norm:g}, its healthy level in "
                    "this run) bounds each step while the cause is fixed.",
                    ctx.snippets.clip(max_norm), ("exploding", "nonfinite"), max_norm=float(max_norm))


def _relu_layers(ctx: Context, f: Finding):
    relu_layers = [la for la in ctx.hidden if la.name in f.layers or la.activation in ("relu", "relu6")]
    return [la for la in relu_layers if la.activation in ("relu", "relu6")] or relu_layers


class LeakyReluRule(Rule):
    """Dead ReLU units."""

    fix = "leaky_relu"

    def propose(self, ctx: Context) -> Candidate | None:
        if not ctx.dead:
            return None
        f = ctx.dead[0]
        relu_layers = _relu_layers(ctx, f)
        if not relu_layers:
            return None
        return _rec("leaky_relu", Priority.LEAKY_RELU, [la.name for la in relu_layers],
                    f"{f.message} A ReLU unit whose input stays negative gets no gradient and never recovers; "
                    "LeakyReLU keeps a small slope there.",
                    ctx.snippets.leaky(relu_layers), ("dead_units",))


class DeadUnitsLearningRateRule(Rule):
    """Dead units under updates far larger than steady ones, when no other rule proposed a lower rate."""

    fix = "lower_learning_rate"

    def propose(self, ctx: Context) -> Candidate | None:
        if not ctx.dead or ctx.has("lower_learning_rate"):
            return None
        f = ctx.dead[0]
        ur = max((la.update_ratio for la in ctx.layers if math.isfinite(la.update_ratio)), default=float("nan"))
        if not (math.isfinite(ur) and ur > 10 * TYPICAL_UPDATE_RATIO):
            return None
        factor = 10 ** max(1, math.ceil(math.log10(ur / TYPICAL_UPDATE_RATIO)))
        return _rec("lower_learning_rate", Priority.LOWER_LEARNING_RATE_DEAD, f.layers,
                    f"{f.message} Updates of {ur:.2g}x the weights per step can push units permanently "
                    "negative; lower the learning rate.",
                    ctx.snippets.lr(factor), ("dead_units",), factor=float(factor))


#: The rules ``recommend`` runs, in this order (a later rule may read what earlier ones proposed).
DEFAULT_RULES: tuple[Rule, ...] = (BoundedActivationRule(), ReluRule(), GatedRnnRule(), ForgetGateBiasRule(),
                                   RecurrentClippingRule(), InitScaleRule(),
                                   NormalizationRule(), SkipConnectionsRule(), LowerLearningRateRule(),
                                   ClippingBoundRule(), LeakyReluRule(), DeadUnitsLearningRateRule())


def lr_factor(update_ratio: float) -> float:
    """Lower the rate by the power of ten that brings ``update_ratio`` to :data:`TYPICAL_UPDATE_RATIO`, between
    10x and 10^MAX_LR_FACTOR_DECADES x."""
    return 10 ** min(MAX_LR_FACTOR_DECADES, max(1, math.ceil(math.log10(update_ratio / TYPICAL_UPDATE_RATIO))))


def _peak_update_ratio(layer: LayerSummary) -> float:
    """The recent update ratio, or, when the recent window has none (a run that turned non-finite), the largest
    one measured earlier in the run; NaN when none was measured."""
    if math.isfinite(layer.update_ratio):
        return layer.update_ratio
    return max((u for u in layer.update_ratio_trend if math.isfinite(u)), default=float("nan"))


def clip_norm(layers: tuple[LayerSummary, ...], finding: Finding) -> float:
    """A max-norm from the early, healthy part of this run: the total gradient norm at the first trend point.

    When the explosion was there from the first step, no healthy level was seen and the first point is already
    blown up; then the common default of 1.0 (Pascanu et al. 2013 clip at a small multiple of the average norm;
    1.0 is the usual starting value) is the suggestion."""
    if finding.step <= 1:
        return 1.0
    total = 0.0
    for la in layers:
        if not la.grad_rms_trend:
            continue
        g = la.grad_rms_trend[0]
        numel = sum(math.prod(p.shape) for p in la.params)
        if math.isfinite(g):
            total += (g * g) * numel
    norm = math.sqrt(total)
    if not math.isfinite(norm) or norm <= 0:
        return 1.0
    exp10 = math.floor(math.log10(norm))
    return float(f"{round(norm / 10 ** exp10) * 10 ** exp10:.1g}") or 1.0
