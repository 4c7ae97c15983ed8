"""From findings and the model's structure to ranked, concrete fixes that name the user's own layers.

Each rule needs both evidence from this run (a finding and its numbers) and a structural fact (what the
model is made of), and never proposes what the model already does. A healthy model gets no recommendation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from gradwatch.core.report import Finding, LayerSummary, Recommendation
from gradwatch.core.structure import RELU_FAMILY, SATURATING, LayerInfo, Structure

__all__ = ["REFERENCES", "recommend"]

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
}

#: Target update ratio ||dw||/||w|| per step (Karpathy, CS231n notes): the factor to lower the rate by.
TARGET_UPDATE_RATIO = 1e-3
#: An initial weight spread off by this factor from its activation's scale, compounded over the stack's depth
#: by more than one order of magnitude, is called a mismatched init.
INIT_TOLERANCE = 0.8
#: Plain stacks at least this deep get normalization / skip-connection advice when gradients decay with depth.
DEEP = 6


@dataclass
class _Candidate:
    score: float
    rec: Recommendation


def recommend(findings: tuple[Finding, ...], structure: Structure | None, layers: tuple[LayerSummary, ...],
              *, framework: str) -> tuple[Recommendation, ...]:
    """Ranked recommendations for these findings on this model; empty when nothing is wrong."""
    health = [f for f in findings if f.kind in ("vanishing", "exploding", "nonfinite", "dead_units", "saturation")]
    if not health or structure is None:
        return ()
    s = _Snippets(framework)
    cands: list[_Candidate] = []
    van = [f for f in findings if f.kind == "vanishing" and not f.evidence.get("through_time")]
    van_time = [f for f in findings if f.kind == "vanishing" and f.evidence.get("through_time")]
    exp = [f for f in findings if f.kind == "exploding" and not f.evidence.get("through_time")]
    exp_time = [f for f in findings if f.kind == "exploding" and f.evidence.get("through_time")]
    nonfinite = [f for f in findings if f.kind == "nonfinite"]
    saturation = [f for f in findings if f.kind == "saturation"]
    dead = [f for f in findings if f.kind == "dead_units"]
    weight_layers = [la for la in structure.layers if la.profile]
    hidden = weight_layers[:-1]  # the output layer's activation is the task's (softmax, sigmoid), not ours to change
    by_name = {la.name: la for la in layers}

    # Saturating activations with vanishing gradients -> ReLU family (+ matching init).
    sat_layers = [la for la in hidden if la.activation in SATURATING and la.kind != "recurrent"]
    if (van or saturation) and sat_layers:
        sat_vals = {la.name: by_name[la.name].saturation for la in sat_layers if la.name in by_name}
        measured = {k: v for k, v in sat_vals.items() if math.isfinite(v)}
        acts = sorted({la.activation for la in sat_layers})
        ev = _evidence(van[0]) if van else saturation[0].message
        why = f"{ev} {len(sat_layers)} hidden layer(s) feed {'/'.join(acts)}, whose derivative is at most " + \
              ("0.25" if acts == ["sigmoid"] else "1 and near 0 once saturated") + \
              ", so the gradient shrinks at every layer on the way back"
        if measured:
            worst = max(measured, key=measured.get)
            if measured[worst] >= 0.1:
                why += f"; {measured[worst]:.0%} of {worst}'s units are saturated"
            else:
                why += (f" (units are not saturated, at most {measured[worst]:.0%}: the loss comes from the "
                        "activation's small slope itself)")
        names = [la.name for la in sat_layers]
        cands.append(_Candidate(95 if measured and max(measured.values()) > 0.3 else 90, Recommendation(
            fix="relu", layers=tuple(names), reason=why + ".", snippet=s.relu(sat_layers),
            references=REFERENCES["relu"], addresses=("vanishing", "saturation"))))

    # Recurrent: vanishing through time in a plain RNN -> LSTM/GRU; exploding through time -> clipping.
    plain_rnn = [la for la in structure.recurrent if (la.recurrent_cell or "").startswith("rnn")]
    if van_time and plain_rnn:
        f = van_time[0]
        d = max(f.evidence.get("time_decades", {}).values(), default=float("nan"))
        cands.append(_Candidate(100, Recommendation(
            fix="gated_rnn", layers=tuple(la.name for la in plain_rnn),
            reason=(f"The gradient reaching the first time steps is {d:.1f} orders of magnitude below the last "
                    f"step's in {', '.join(la.name for la in plain_rnn)}, a plain {plain_rnn[0].type} "
                    f"({plain_rnn[0].recurrent_cell}): its gradient through time is a product of Jacobians that "
                    "shrinks geometrically. A gated cell (LSTM/GRU) carries it through an additive memory path."),
            snippet=s.gated(plain_rnn), references=REFERENCES["gated_rnn"], addresses=("vanishing",))))
    rnn_layers = list(structure.recurrent)
    clip_reason = None
    if exp_time and rnn_layers:
        f = exp_time[0]
        d = max((-v for v in f.evidence.get("time_decades", {}).values()), default=float("nan"))
        radius = [la.recurrent_radius for la in rnn_layers if la.recurrent_radius]
        clip_reason = (f"The gradient grows {d:.1f} orders of magnitude from the last time step back to the first "
                       f"in {', '.join(la.name for la in rnn_layers)}")
        if radius:
            clip_reason += f"; the recurrent weight's spectral radius is {max(radius):.2f} (> 1 amplifies)"
        if any(r > 1.05 for r in radius):
            clip_reason += ", so also start it orthogonal (radius 1): clipping bounds the step, not the growth"
    elif (exp or nonfinite) and rnn_layers:
        clip_reason = (f"{_evidence((exp or nonfinite)[0])} The model is recurrent "
                       f"({', '.join(la.name for la in rnn_layers)}), where gradients through time can blow up")
    if clip_reason:
        max_norm = _clip_norm(layers, (exp_time or exp or nonfinite)[0])
        # An explosion that came first (and saturated the cell into vanishing) is the one to fix first.
        first = exp_time and (not van_time or exp_time[0].step <= van_time[0].step)
        cands.append(_Candidate(101 if first else 97, Recommendation(
            fix="gradient_clipping", layers=tuple(la.name for la in rnn_layers),
            reason=clip_reason + (f". Clip the global gradient norm near its healthy level (~{max_norm:g})."
                                  if (exp_time or exp or nonfinite)[0].step > 1 else
                                  ". It explodes from the first step, so clip the global gradient norm at the usual "
                                  f"starting value, {max_norm:g}."),
            snippet=s.clip(max_norm, [la for la in rnn_layers if (la.recurrent_radius or 0) > 1.05]),
            references=REFERENCES["gradient_clipping"], addresses=("exploding", "nonfinite"))))

    # Initialization scale against the activation's scale.
    init = _init_mismatch(weight_layers)
    if init is not None and (van or exp or nonfinite or dead):
        ratio, mism = init
        too_small = ratio < 1
        fam = "he_init" if any(la.activation in RELU_FAMILY for la in mism) or not any(
            la.activation in SATURATING for la in mism) else "xavier_init"
        relevant = (too_small and (van or dead)) or (not too_small and (exp or nonfinite))
        # He init is for the layers feeding a ReLU-family activation, Xavier for the others that feed one; an
        # output layer (no activation after it) keeps its own init.
        mism = [la for la in mism if la.activation is not None
                and (la.activation in RELU_FAMILY) == (fam == "he_init")]
        if relevant and mism:
            target = "He (sqrt(2/fan_in))" if fam == "he_init" else "Xavier/Glorot (sqrt(2/(fan_in+fan_out)))"
            first = mism[0]
            compounded = ratio ** len(weight_layers)
            reason = (f"{_evidence((van or exp or nonfinite or dead)[0])} Initial weight spread is {ratio:.2f}x the "
                      f"{target} scale for the {first.activation or 'linear'} activations (e.g. {first.name}: std "
                      f"{first.weight_std:.3g} vs {first.target_std:.3g}); over {len(weight_layers)} layers that "
                      f"compounds to about {compounded:.2g}x in the signal and gradient.")
            score = 93 if fam == "he_init" and not sat_layers else 85
            cands.append(_Candidate(score, Recommendation(
                fix=fam, layers=tuple(la.name for la in mism), reason=reason,
                snippet=s.init(fam, mism), references=REFERENCES[fam],
                addresses=("vanishing", "exploding") if not dead else ("dead_units",))))

    # Depth without normalization / skip connections.
    depth = structure.depth
    sequence = any(la.kind in ("recurrent", "attention", "embedding") for la in structure.layers)
    profile_finding = (van or exp)
    if profile_finding and depth >= DEEP and not structure.has_norm:
        fix = "layer_norm" if sequence else "batch_norm"
        targets = [la for la in hidden if la.kind in ("dense", "conv")]
        if targets:
            cands.append(_Candidate(80, Recommendation(
                fix=fix, layers=tuple(la.name for la in targets),
                reason=(f"{_evidence(profile_finding[0])} The model is "
                        f"{depth} weight layers deep with no normalization layer, so nothing re-centres and "
                        "re-scales activations between layers."),
                snippet=s.norm(fix, targets), references=REFERENCES[fix], addresses=("vanishing", "exploding"))))
    if van and depth >= DEEP and not structure.has_residual:
        targets = [la for la in hidden if la.kind in ("dense", "conv")]
        if targets:
            cands.append(_Candidate(75, Recommendation(
                fix="skip_connections", layers=tuple(la.name for la in targets),
                reason=(f"{_evidence(van[0])} The network is a plain stack of {depth} weight layers with no "
                        "skip connection: every gradient must pass through every layer's Jacobian. Residual "
                        "additions give it an identity path."),
                snippet=s.skip(targets), references=REFERENCES["skip_connections"], addresses=("vanishing",))))

    # Exploding with a sane init -> lower learning rate.
    if (exp or nonfinite) and not exp_time:
        f = (exp or nonfinite)[0]
        peaks = sorted(u for u in (_peak_update_ratio(la) for la in layers) if math.isfinite(u))
        ur = peaks[len(peaks) // 2] if peaks else float("nan")  # the typical layer, not the one outlier
        sane_init = init is None or init[0] <= 1
        if sane_init:
            if math.isfinite(ur) and ur > TARGET_UPDATE_RATIO:
                factor = 10 ** min(3, max(1, math.ceil(math.log10(ur / TARGET_UPDATE_RATIO))))
                basis = (f"the median layer's update ratio ||dw||/||w|| reached {ur:.2g} per step, against "
                         f"~{TARGET_UPDATE_RATIO:g} for steady training")
            else:
                factor = 10
                basis = "updates diverge before the update ratio settles"
            reason = (f"{_evidence(f)} The initialization is within range of its activations' scale, so the step size "
                      f"is the likely cause: {basis}. Lower the learning rate about {factor:g}x.")
            cands.append(_Candidate(96 if not rnn_layers else 90, Recommendation(
                fix="lower_learning_rate", layers=tuple(f.layers), reason=reason, snippet=s.lr(factor),
                references=REFERENCES["lower_learning_rate"], addresses=("exploding", "nonfinite"))))
        if not rnn_layers and not any(c.rec.fix == "gradient_clipping" for c in cands):
            max_norm = _clip_norm(layers, f)
            cands.append(_Candidate(70, Recommendation(
                fix="gradient_clipping", layers=tuple(f.layers),
                reason=f"{_evidence(f)} Clipping the global gradient norm (~{max_norm:g}, its healthy level in this run) "
                       "bounds each step while the cause is fixed.",
                snippet=s.clip(max_norm), references=REFERENCES["gradient_clipping"],
                addresses=("exploding", "nonfinite"))))

    # Dead ReLUs.
    if dead:
        f = dead[0]
        relu_layers = [la for la in hidden if la.name in f.layers or la.activation in ("relu", "relu6")]
        relu_layers = [la for la in relu_layers if la.activation in ("relu", "relu6")] or relu_layers
        if relu_layers:
            cands.append(_Candidate(88, Recommendation(
                fix="leaky_relu", layers=tuple(la.name for la in relu_layers),
                reason=(f"{f.message} A ReLU unit whose input stays negative gets no gradient and never recovers; "
                        "LeakyReLU keeps a small slope there."),
                snippet=s.leaky(relu_layers), references=REFERENCES["leaky_relu"], addresses=("dead_units",))))
        ur = max((la.update_ratio for la in layers if math.isfinite(la.update_ratio)), default=float("nan"))
        if math.isfinite(ur) and ur > 10 * TARGET_UPDATE_RATIO and not any(
                c.rec.fix == "lower_learning_rate" for c in cands):
            factor = 10 ** max(1, math.ceil(math.log10(ur / TARGET_UPDATE_RATIO)))
            cands.append(_Candidate(84, Recommendation(
                fix="lower_learning_rate", layers=tuple(f.layers),
                reason=(f"{f.message} Updates of {ur:.2g}x the weights per step can push units permanently "
                        "negative; lower the learning rate."),
                snippet=s.lr(factor), references=REFERENCES["lower_learning_rate"], addresses=("dead_units",))))

    # One recommendation per fix, best score first.
    best: dict[str, _Candidate] = {}
    for c in cands:
        if c.rec.fix not in best or c.score > best[c.rec.fix].score:
            best[c.rec.fix] = c
    ranked = sorted(best.values(), key=lambda c: -c.score)
    return tuple(_with_rank(c.rec, i + 1) for i, c in enumerate(ranked))


def _with_rank(rec: Recommendation, rank: int) -> Recommendation:
    return Recommendation(fix=rec.fix, layers=rec.layers, reason=rec.reason, snippet=rec.snippet,
                          references=rec.references, rank=rank, addresses=rec.addresses)


def _evidence(f: Finding) -> str:
    """The one clause of a finding's numbers a recommendation's reason starts from."""
    ev = f.evidence
    if f.kind == "vanishing" and "worst_layer" in ev:
        worst = ev["worst_layer"]
        d = ev.get("decades_from_reference", {}).get(worst, float("nan"))
        gap = "all the way to zero" if not math.isfinite(d) else f"{d:.1f} orders of magnitude"
        return (f"Gradient RMS at {worst} is {gap} below the output side ({ev.get('reference_layer')}), "
                f"vanishing in {len(f.layers)} layer(s) since step {f.step}.")
    if f.kind == "exploding" and "worst_layer" in ev:
        worst = ev["worst_layer"]
        return (f"Gradients explode in {len(f.layers)} layer(s) since step {f.step} "
                f"(gradient RMS {ev.get('layer_grad_rms', {}).get(worst, float('nan')):.2g} at {worst}).")
    if f.kind == "nonfinite":
        return (f"Non-finite gradients since step {f.step}, first in {ev.get('origin_layer')} "
                "(in backward order).")
    return f.message


def _init_mismatch(weight_layers: list[LayerInfo]) -> tuple[float, list[LayerInfo]] | None:
    """Geometric-mean ratio of weight std to the scale each layer's activation calls for, and the layers off
    by more than the tolerance, when the mismatch compounds to over an order of magnitude over the depth."""
    ratios = []
    off = []
    for la in weight_layers:
        if la.kind not in ("dense", "conv") or la.weight_std is None or not la.fan_in:
            continue
        target = la.target_std
        if not math.isfinite(target) or target <= 0:
            continue
        r = la.weight_std / target
        ratios.append(r)
        if r < INIT_TOLERANCE or r > 1 / INIT_TOLERANCE:
            off.append(la)
    if len(ratios) < 2 or not off:
        return None
    gmean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    if abs(len(ratios) * math.log10(gmean)) < 1.0:
        return None
    return gmean, off


def _peak_update_ratio(layer: LayerSummary) -> float:
    """The recent update ratio, or, when the recent window has none (a run that turned non-finite), the largest
    one measured earlier in the run; NaN when none was measured."""
    if math.isfinite(layer.update_ratio):
        return layer.update_ratio
    return max((u for u in layer.update_ratio_trend if math.isfinite(u)), default=float("nan"))


def _clip_norm(layers: tuple[LayerSummary, ...], finding: Finding) -> float:
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


class _Snippets:
    """Code in the user's framework, naming their layers."""

    def __init__(self, framework: str) -> None:
        self.keras = framework == "keras"

    @staticmethod
    def _names(layers: list[LayerInfo]) -> str:
        return "[" + ", ".join(repr(la.name) for la in layers) + "]"

    def relu(self, layers: list[LayerInfo]) -> str:
        names = self._names(layers)
        if self.keras:
            lines = [f"# layers {names}: use ReLU with He initialization",
                     "layers.Dense(units, activation=\"relu\", kernel_initializer=\"he_normal\")"]
            if any(la.activation_source == "module" for la in layers):
                lines.append(f"# where the activation is its own layer:\nlayers.Activation(\"{layers[0].activation}\")"
                             "   ->   layers.ReLU()")
            return "\n".join(lines)
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
        names = self._names(layers)
        if self.keras:
            init = "he_normal" if fix == "he_init" else "glorot_uniform"
            return f"# layers {names}\nlayers.Dense(units, activation=..., kernel_initializer=\"{init}\")"
        if fix == "he_init":
            call = "nn.init.kaiming_normal_(layer.weight, nonlinearity=\"relu\")"
        else:
            act = layers[0].activation if layers[0].activation in ("tanh", "sigmoid") else "linear"
            call = f"nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain({act!r}))"
        return (f"for name in {names}:\n    layer = model.get_submodule(name)\n    {call}\n"
                "    if layer.bias is not None:\n        nn.init.zeros_(layer.bias)")

    def norm(self, fix: str, layers: list[LayerInfo]) -> str:
        names = self._names(layers)
        if self.keras:
            layer = "layers.BatchNormalization()" if fix == "batch_norm" else "layers.LayerNormalization()"
            return f"# after each of {names}, before its activation:\n{layer}"
        first = layers[0]
        if fix == "batch_norm":
            mod = f"nn.BatchNorm{'2d' if first.kind == 'conv' else '1d'}({first.fan_out if first.kind != 'conv' else 'out_channels'})"
        else:
            mod = "nn.LayerNorm(features)"
        return f"# after each of {names}, before its activation, e.g.\n# {first.name} -> activation  becomes  {first.name} -> {mod} -> activation"

    def skip(self, layers: list[LayerInfo]) -> str:
        names = self._names(layers)
        if self.keras:
            return (f"# wrap pairs of {names} in residual blocks:\n"
                    "y = layers.Dense(units, activation=\"relu\")(x)\ny = layers.Dense(units)(y)\n"
                    "x = layers.Activation(\"relu\")(layers.Add()([x, y]))")
        return (f"# group {names} into residual blocks (equal widths):\n"
                "class Residual(nn.Module):\n    def __init__(self, block):\n        super().__init__()\n"
                "        self.block = block\n    def forward(self, x):\n        return x + self.block(x)")

    def clip(self, max_norm: float, amplifying: Sequence[LayerInfo] = ()) -> str:
        names = self._names(list(amplifying)) if amplifying else ""
        if self.keras:
            code = f"optimizer = keras.optimizers.Adam(learning_rate=..., clipnorm={max_norm:g})"
            if amplifying:
                code += (f"\n# and for the recurrent layers {names}:\n"
                         "layers.SimpleRNN(..., recurrent_initializer=\"orthogonal\")")
            return code
        code = ("loss.backward()\n"
                f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm:g})\n"
                "optimizer.step()")
        if amplifying:
            code += (f"\n# once, before training: recurrent weights at spectral radius 1\nfor name in {names}:\n"
                     "    rnn = model.get_submodule(name)\n"
                     "    for w in (p for n, p in rnn.named_parameters() if n.startswith(\"weight_hh\")):\n"
                     "        nn.init.orthogonal_(w)")
        return code

    def lr(self, factor: float) -> str:
        if self.keras:
            return f"optimizer.learning_rate = optimizer.learning_rate / {factor:g}"
        return f"for group in optimizer.param_groups:\n    group[\"lr\"] /= {factor:g}"

    def gated(self, layers: list[LayerInfo]) -> str:
        names = self._names(layers)
        if self.keras:
            return f"# replace {names}:\nlayers.SimpleRNN(units)   ->   layers.LSTM(units)"
        return f"# replace {names}:\nnn.RNN(input_size, hidden_size, ...)   ->   nn.LSTM(input_size, hidden_size, ...)\n# (nn.LSTM returns (output, (h, c)) instead of (output, h))"

    def leaky(self, layers: list[LayerInfo]) -> str:
        names = self._names(layers)
        if self.keras:
            code = (f"# layers {names}:\n"
                    "layers.Dense(units, activation=\"leaky_relu\", kernel_initializer=\"he_normal\")")
            if any(la.activation_source == "module" for la in layers):
                code += ("\n# where the activation is its own layer:\n"
                         "layers.ReLU()   ->   layers.LeakyReLU(negative_slope=0.01)")
            return code
        return f"# after layers {names}:\nnn.ReLU()   ->   nn.LeakyReLU(0.01)"
