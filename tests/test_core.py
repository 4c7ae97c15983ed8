"""The pure core on synthetic rows: each check, the hysteresis voter, History coarsening, each recommender rule.

These need no framework; the end-to-end tests on real training are in test_torch.py and test_keras.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch.core.advice import rules as R
from gradwatch.core.advice.base import Context
from gradwatch.core.checks import Ledger, Thresholds, Voter
from gradwatch.core.detector import Detector
from gradwatch.core.recommender import recommend
from gradwatch.core.report import Finding, LayerSummary, ParamSummary
from gradwatch.core.stats import GRAD_NORM, ActivationRows, History, LayerRows, ParamTable, StepBatch, time_decades
from gradwatch.core.structure import LayerInfo, Structure

N = 5  # layers, input to output
NAMES = tuple(f"l{i}" for i in range(N))


def rows(rms, *, steps=None, ur=None, nonfinite=None, skipped=None, measured=True, norm=None) -> LayerRows:
    """Per-layer rows from an ``(n_steps, N)`` array of gradient RMS (layers of one element, so norm == RMS)."""
    rms = np.atleast_2d(np.asarray(rms, dtype=float))
    n = len(rms)
    full = lambda v, fill: np.full((n, N), fill) if v is None else np.broadcast_to(np.asarray(v, float), (n, N))  # noqa: E731
    return LayerRows(steps=np.arange(1, n + 1) if steps is None else np.asarray(steps),
                     grad_norm=full(norm, 0) if norm is not None else rms, grad_rms=rms, grad_max=rms,
                     nonfinite=full(nonfinite, 0.0), weight_norm=np.ones((n, N)), update_ratio=full(ur, np.nan),
                     present=~np.isnan(rms),
                     skipped=np.zeros(n, bool) if skipped is None else np.asarray(skipped, bool),
                     nonfinite_measured=np.full(n, measured))


def detector(**kw) -> Detector:
    return Detector(NAMES, (True,) * N, Thresholds(**kw), plain_recurrent=(True,) + (False,) * (N - 1))


# -- the voter ----------------------------------------------------------------------------------------------

def test_voter_opens_at_on_fraction_dated_from_the_first_vote_and_closes_at_off_fraction():
    ledger = Ledger()
    voter = Voter(ledger, "k", "vanishing", "test", window=10, on_fraction=0.7, off_fraction=0.2)
    yes, no = np.array([True, False]), np.array([False, False])
    opened = [voter.vote(s, yes) for s in range(1, 7)]
    assert opened == [None] * 6  # 6 of 10 is not enough
    ep = voter.vote(7, yes)
    assert ep is not None and ep.first_step == 1 and ep.layers == {0: 1}
    for s in range(8, 15):  # the window now holds 7 "no": 3 "yes" left, still above 2 of 10
        assert voter.vote(s, no) is ep
    assert voter.vote(15, no) is None and not ep.active and ep.last_step == 15


# -- checks ---------------------------------------------------------------------------------------------------

def _vanishing_profile(n=10):
    return np.tile([1e-7, 1e-6, 1e-5, 1e-2, 1e-2], (n, 1))


def test_gradient_scale_check_finds_vanishing_early_layers():
    det = detector()
    assert det.update(rows(_vanishing_profile(6))) == []
    (f,) = det.update(rows(_vanishing_profile(1), steps=[7]))
    assert (f.kind, f.check, f.step, f.layers) == ("vanishing", "gradient_scale", 1, ("l0", "l1", "l2"))
    assert f.evidence["worst_layer"] == "l0" and f.evidence["decades_from_reference"]["l0"] == pytest.approx(5.0)
    assert det.layer_status() == ["vanishing"] * 3 + ["ok"] * 2


def test_a_batch_of_rows_gives_the_findings_row_by_row_gives():
    """The depth profile's description of an open episode is deferred (``Ledger.defer``), as of the last row that
    found it open: a flush of many rows must give what the same rows one at a time give, evidence and messages
    included, for an episode that closes inside the batch, one that reopens deeper, and a burst that the loss
    scaler's check then describes (it gets the episode after the burst's rows deferred theirs)."""
    rng = np.random.default_rng(0)
    noisy = lambda a: a * rng.uniform(0.5, 2.0, a.shape)  # noqa: E731
    rms = np.vstack([noisy(_vanishing_profile(14)), noisy(np.full((16, N), 1e-2)),
                     noisy(np.tile([1e-9, 1e-8, 1e-6, 1e-4, 1e-2], (14, 1))), np.full((3, N), 1e4),
                     np.full((10, N), np.nan)])
    skipped = np.arange(len(rms)) >= len(rms) - 10  # the loss scaler skips the last 10 steps
    batched, single = detector(), detector()
    batched.update(rows(rms, skipped=skipped))
    for k in range(len(rms)):
        single.update(rows(rms[k:k + 1], steps=[k + 1], skipped=skipped[k:k + 1]))
    assert [(f.kind, f.step, f.active) for f in batched.findings] == [
        ("vanishing", 1, False), ("vanishing", 31, True), ("exploding", 45, True)]
    assert batched.findings[-1].evidence["amp_skipped_steps"] == 10
    assert repr(batched.findings) == repr(single.findings)  # repr: NaN evidence compares equal


def test_gradient_scale_check_is_silent_on_a_flat_profile_and_on_a_converged_model():
    det = detector()
    assert det.update(rows(np.full((20, N), 1e-3))) == []
    assert det.update(rows(np.full((20, N), 1e-12), steps=np.arange(21, 41))) == []  # tiny everywhere: relative


def test_gradient_scale_check_finds_geometric_norm_growth():
    growth = np.outer(2.0 ** np.arange(20), np.ones(N)) * 1e-3
    found = detector().update(rows(growth))
    (f,) = found
    assert f.kind == "exploding" and f.evidence["norm_growth_decades"] > 1.5 and "total norm up" in f.message


def test_nonfinite_check_reports_at_once_with_the_backward_origin_and_closes_after_a_finite_window():
    det = detector()
    det.update(rows(np.full((3, N), 1e-2)))
    bad = np.full((1, N), 1e-2)
    bad[0, :3] = np.nan
    (f,) = det.update(rows(bad, steps=[4], nonfinite=[[5, 5, 5, 0, 0]]))
    assert f.kind == "nonfinite" and f.step == 4 and f.evidence["origin_layer"] == "l2"
    assert f.evidence["nonfinite_values"] == 15
    det.update(rows(np.full((10, N), 1e-2), steps=np.arange(5, 15)))
    assert not det.findings[0].active


def test_nonfinite_check_calls_a_float32_norm_overflow_exploding():
    over = np.full((1, N), 1e-2)
    over[0, 1] = np.inf
    (f,) = detector().update(rows(over, nonfinite=0.0))
    assert (f.kind, f.check, f.severity) == ("exploding", "nonfinite", "critical") and f.layers == ("l1",)


def test_loss_scale_check_only_calls_persistent_skips_exploding():
    det = detector()
    sparse = rows(np.full((10, N), np.nan), skipped=[True, False] * 5)
    assert det.update(sparse) == []
    (f,) = det.update(rows(np.full((10, N), np.nan), steps=np.arange(11, 21), skipped=[True] * 10))
    assert f.kind == "exploding" and f.check == "loss_scale" and f.evidence["amp_skipped_steps"] >= 8


def acts(n, *, saturation=np.nan, dead=np.nan, time=np.nan, start=1) -> ActivationRows:
    grid = lambda v: np.broadcast_to(np.asarray(v, float), (n, N)).copy()  # noqa: E731
    return ActivationRows(steps=np.arange(start, start + n) * 25, saturation=grid(saturation), dead=grid(dead),
                          rms=grid(1.0), nonfinite=grid(0.0), time_decades=grid(time))


def test_saturation_and_dead_unit_checks_need_most_of_their_window():
    det = detector()
    assert det.update_activations(acts(1, saturation=0.9)) == []
    assert det.update_activations(acts(1, saturation=0.0, start=2)) == []
    assert det.update_activations(acts(2, saturation=[0.9, 0.9, 0, 0, 0], start=3)) == []  # 2 of 3
    (f,) = det.update_activations(acts(1, saturation=[0.9, 0.9, 0, 0, 0], start=5))
    assert f.kind == "saturation" and f.layers == ("l0", "l1") and f.evidence["fraction"]["l0"] == 0.9
    (d,) = detector().update_activations(acts(3, dead=[0, 0, 0.6, 0, 0]))
    assert d.kind == "dead_units" and d.layers == ("l2",)


def test_through_time_check_judges_vanishing_for_plain_cells_and_extreme_explosion_at_once():
    det = detector()
    (v,) = det.update_activations(acts(3, time=[3.0, 3.0, np.nan, np.nan, np.nan]))
    assert (v.kind, v.check, v.layers) == ("vanishing", "through_time", ("l0",))  # l1 is a gated cell
    assert v.through_time and v.evidence["time_decades"] == {"l0": 3.0}
    (e,) = detector().update_activations(acts(1, time=[-4.5, np.nan, np.nan, np.nan, np.nan]))
    assert (e.kind, e.check, e.severity) == ("exploding", "through_time", "critical")


def test_time_decades_compares_the_edges_of_the_sequence():
    assert time_decades(np.ones(60)) == 0.0
    assert time_decades(np.r_[np.zeros(6), np.ones(54)]) == math.inf
    assert math.isnan(time_decades(np.ones(3)))


# -- history ------------------------------------------------------------------------------------------------

def test_history_coarsens_pairwise_and_keeps_every_step_accounted_for():
    table = ParamTable.build([(n, "Linear", "dense", [(f"{n}.weight", "weight", (1,), True)]) for n in NAMES])
    hist = History(table, capacity=8)
    values = np.full((20, N, 5), np.nan)
    values[..., GRAD_NORM] = np.arange(1, 21)[:, None]
    hist.extend(StepBatch(steps=np.arange(1, 21), values=values, skipped=np.zeros(20, bool)))
    assert len(hist) <= 8 and hist.spans.sum() == 20 and hist.total_steps == 20
    assert hist.steps[0] == 1 and hist.steps[-1] == 20
    first = hist.values[0, 0, GRAD_NORM]
    span = hist.spans[0]
    assert first == pytest.approx(np.sqrt(np.mean(np.arange(1, span + 1) ** 2.0)))  # RMS over time


# -- recommender rules --------------------------------------------------------------------------------------

def finding(kind, layers=("l0", "l1"), step=1, check="gradient_scale", **evidence) -> Finding:
    return Finding(kind=kind, layers=tuple(layers), step=step, last_step=step + 9, evidence=evidence, check=check)


def structure(act="sigmoid", std=None, depth=N, *, cell=None, radius=None, norm=False, residual=0) -> Structure:
    layers = []
    for i in range(depth):
        last = i == depth - 1
        kind = "recurrent" if cell and i == 0 else "dense"
        layers.append(LayerInfo(name=f"l{i}", type="RNN" if kind == "recurrent" else "Linear", kind=kind, index=i,
                                fan_in=64, fan_out=64, activation=None if last else act, activation_source="module",
                                weight_std=std, recurrent_cell=cell if kind == "recurrent" else None,
                                recurrent_radius=radius if kind == "recurrent" else None))
    return Structure(framework="torch", model_type="M", layers=tuple(layers), norm_layers=("bn",) if norm else (),
                     residual_adds=residual)


def summaries(ur=1e-3, depth=N) -> tuple[LayerSummary, ...]:
    return tuple(LayerSummary(name=f"l{i}", type="Linear", index=i, status="ok", grad_rms=1e-3,
                              grad_rms_trend=(1e-3,), update_ratio=ur, weight_norm=1.0, nonfinite=0,
                              params=(ParamSummary(name=f"l{i}.weight", role="weight", shape=(64, 64), trainable=True,
                                                   grad_rms=1e-3, grad_max=1e-3, nonfinite=0),))
                 for i in range(depth))


def fixes(findings, struct, layers=None) -> list[str]:
    return [r.fix for r in recommend(tuple(findings), struct, layers or summaries(), framework="torch")]


VAN = finding("vanishing", worst_layer="l0", decades_from_reference={"l0": 4.0}, reference_layer="l4")
EXP = finding("exploding", step=5, worst_layer="l1", layer_grad_rms={"l1": 10.0})


@pytest.mark.parametrize("rule, findings, struct, proposes", [
    (R.ReluRule(), [VAN], structure("sigmoid"), True),
    (R.ReluRule(), [VAN], structure("relu"), False),
    (R.GatedRnnRule(), [finding("vanishing", ("l0",), check="through_time", time_decades={"l0": 3.0})],
     structure("tanh", cell="rnn_tanh"), True),
    (R.GatedRnnRule(), [finding("vanishing", ("l0",), check="through_time", time_decades={"l0": 3.0})],
     structure("tanh", cell="lstm"), False),
    (R.RecurrentClippingRule(), [finding("exploding", ("l0",), check="through_time", time_decades={"l0": -3.0})],
     structure("tanh", cell="rnn_tanh", radius=3.0), True),
    (R.RecurrentClippingRule(), [EXP], structure("relu"), False),
    (R.InitScaleRule(), [VAN], structure("relu", std=0.05), True),  # He std for fan_in 64 is 0.177
    (R.InitScaleRule(), [VAN], structure("relu", std=0.177), False),
    (R.NormalizationRule(), [VAN], structure("relu", depth=8), True),
    (R.NormalizationRule(), [VAN], structure("relu", depth=8, norm=True), False),
    (R.SkipConnectionsRule(), [VAN], structure("relu", depth=8), True),
    (R.SkipConnectionsRule(), [VAN], structure("relu", depth=8, residual=3), False),
    (R.LowerLearningRateRule(), [EXP], structure("relu", std=0.177), True),
    (R.LowerLearningRateRule(), [EXP], structure("relu", std=1.0), False),  # the init is the cause
    (R.ClippingBoundRule(), [EXP], structure("relu"), True),
    (R.ClippingBoundRule(), [EXP], structure("tanh", cell="rnn_tanh"), False),
    (R.LeakyReluRule(), [finding("dead_units", ("l1",), check="dead_units")], structure("relu"), True),
    (R.LeakyReluRule(), [EXP], structure("relu"), False),
])
def test_each_rule_needs_its_evidence_and_its_structural_fact(rule, findings, struct, proposes):
    ctx = Context.build(tuple(findings), struct, summaries(), "torch")
    assert (rule.propose(ctx) is not None) == proposes


def test_dead_units_under_large_updates_also_get_a_lower_learning_rate():
    dead = [finding("dead_units", ("l1",), check="dead_units")]
    assert fixes(dead, structure("relu"), summaries(ur=0.5)) == ["leaky_relu", "lower_learning_rate"]
    assert fixes(dead, structure("relu"), summaries(ur=1e-3)) == ["leaky_relu"]


def test_ranking_puts_the_root_cause_first_and_proposes_each_fix_once():
    assert fixes([VAN], structure("sigmoid", depth=8)) == ["relu", "batch_norm", "skip_connections"]
    assert fixes([EXP], structure("relu", std=0.177)) == ["lower_learning_rate", "gradient_clipping"]
    assert fixes([], structure("sigmoid")) == []
    assert recommend((VAN,), None, summaries(), framework="torch") == ()


def test_snippets_follow_the_framework():
    keras = recommend((VAN,), structure("sigmoid"), summaries(), framework="keras")[0]
    torch = recommend((VAN,), structure("sigmoid"), summaries(), framework="torch")[0]
    assert 'activation="relu"' in keras.snippet and "nn.ReLU()" in torch.snippet


# -- issue 11's rules -----------------------------------------------------------------------------------------

def detector_named(names, *, adaptive=False, **kw) -> Detector:
    return Detector(tuple(names), (True,) * len(names), Thresholds(**kw), plain_recurrent=(False,) * len(names),
                    gated_recurrent=(False,) * len(names), adaptive=adaptive)


def named_rows(rms, names, **kw) -> LayerRows:
    rms = np.atleast_2d(np.asarray(rms, float))
    n, k = rms.shape
    full = lambda v, fill: np.full((n, k), fill) if v is None else np.broadcast_to(np.asarray(v, float), (n, k))  # noqa: E731
    steps = kw.get("steps", np.arange(1, n + 1))
    return LayerRows(steps=np.asarray(steps), grad_norm=rms, grad_rms=rms, grad_max=rms, nonfinite=np.zeros((n, k)),
                     weight_norm=np.ones((n, k)), update_ratio=full(kw.get("ur"), np.nan), present=~np.isnan(rms),
                     skipped=np.zeros(n, bool), nonfinite_measured=np.ones(n, bool),
                     loss=None if kw.get("loss") is None else np.asarray(kw["loss"], float))


BLOCKS = [f"enc.layer.{i}.{role}" for i in range(4) for role in ("query", "ffn")] + ["head"]
# Queries are 1e-6 in every block, the FFNs and the head 1e-2: small by role, the same in every block.
QK_SMALL = [1e-6 if name.endswith("query") else 1e-2 for name in BLOCKS]


def test_a_role_small_in_every_block_is_not_compared_with_the_head():
    det = detector_named(BLOCKS)
    assert det.update(named_rows(np.tile(QK_SMALL, (20, 1)), BLOCKS)) == []


def test_a_role_that_fades_block_after_block_vanishes_against_its_peers():
    fading = [10.0 ** -(8 - 2 * int(n.split(".")[2])) if n.endswith("query") else 1e-2 for n in BLOCKS]
    (f,) = detector_named(BLOCKS).update(named_rows(np.tile(fading, (10, 1)), BLOCKS))
    assert f.layers == ("enc.layer.0.query", "enc.layer.1.query")
    assert f.evidence["reference_of"]["enc.layer.0.query"] in ("enc.layer.2.query", "enc.layer.3.query")
    assert "its peer" in f.message


def test_under_an_adaptive_optimizer_a_small_gradient_vanishes_only_with_small_updates():
    names = [str(i) for i in range(6)]
    profile = np.tile([1e-9, 1e-8, 1e-7, 1e-5, 1e-3, 1e-2], (10, 1))
    same_updates = named_rows(profile, names, ur=1e-3)
    assert detector_named(names, adaptive=True).update(same_updates) == []
    assert detector_named(names, adaptive=False).update(same_updates) != []  # SGD: the gradient is the update
    lagging = named_rows(profile, names, ur=[[1e-7, 1e-6, 1e-5, 1e-3, 1e-3, 1e-3]])
    (f,) = detector_named(names, adaptive=True).update(lagging)
    assert f.kind == "vanishing" and f.layers == ("0", "1", "2")


def test_slow_sustained_growth_is_exploding_however_gently_it_rises():
    names = [str(i) for i in range(3)]
    gentle = np.outer(10 ** (np.arange(60) * 0.08), np.ones(3)) * 1e-2  # x1.2 a step: never 1.5 decades in 6
    found = detector_named(names).update(named_rows(gentle, names))
    assert [f.kind for f in found] == ["exploding"]
    assert found[0].evidence["growth_since_first_steps_decades"] >= 2


def test_a_burst_is_exploding_at_once_but_one_noisy_step_is_not():
    names = [str(i) for i in range(3)]
    quiet = np.full((8, 3), 1e-2)
    spike = np.vstack([quiet, np.full((1, 3), 1e3), quiet])
    assert detector_named(names).update(named_rows(spike, names)) == []
    burst = np.vstack([quiet, np.full((2, 3), 1e3)])
    (f,) = detector_named(names).update(named_rows(burst, names))
    assert f.kind == "exploding" and f.step == 9 and f.severity == "critical"


def test_exact_zeros_on_every_step_are_no_gradient():
    det = detector()
    zeros = np.zeros((10, N))
    (f,) = det.update(rows(zeros))
    assert (f.kind, f.check, f.step) == ("no_gradient", "no_gradient", 1) and f.evidence["all_weight_layers"]
    assert det.update(rows(np.full((1, N), 1e-3), steps=[11])) == [] and not det.findings[0].active


def test_a_gated_cell_vanishes_through_time_only_when_the_fade_persists():
    gated = Detector(NAMES, (True,) * N, Thresholds(), plain_recurrent=(False,) * N,
                     gated_recurrent=(True,) + (False,) * (N - 1))
    fade = [9.0, np.nan, np.nan, np.nan, np.nan]
    assert gated.update_activations(acts(4, time=fade)) == []  # 4 of 6: still learning to open its gates
    (f,) = gated.update_activations(acts(1, time=fade, start=5))
    assert f.through_time and f.evidence["gated"] == ["l0"] and f.evidence["threshold_decades"] == 6.0


def test_a_diverging_loss_is_exploding_and_a_falling_one_is_not():
    names = [str(i) for i in range(3)]
    flat = np.full((30, 3), 1e-2)
    falling = named_rows(flat, names, loss=np.linspace(3.0, 0.5, 30))
    assert detector_named(names).update(falling) == []
    rising = named_rows(flat, names, loss=np.r_[np.full(10, 3.0), np.full(20, 40.0)])
    (f,) = detector_named(names).update(rising)
    assert (f.kind, f.check) == ("exploding", "loss") and f.evidence["loss_growth_decades"] > 1


def test_a_nan_born_in_an_exp_gets_bounded_activation_first():
    nan = finding("nonfinite", ("l3",), step=3, check="nonfinite", origin_layer="l4", forward_origin_layer="l1",
                  forward_origin_step=3)
    struct = structure("relu", std=0.177)
    layers = list(struct.layers)
    layers[1] = LayerInfo(**{**{f: getattr(layers[1], f) for f in layers[1].__dataclass_fields__}, "activation": "exp"})
    struct = Structure(framework="torch", model_type="M", layers=tuple(layers))
    assert fixes([nan], struct)[0] == "bounded_activation"
    assert fixes([nan], structure("relu", std=0.177))[0] == "lower_learning_rate"  # no exp: the step size


def test_a_tanh_stack_started_too_small_gets_its_init_before_a_new_activation():
    assert fixes([VAN], structure("tanh", std=0.05))[:2] == ["xavier_init", "relu"]
    assert fixes([VAN], structure("sigmoid", std=0.05))[0] == "relu"  # sigmoid vanishes at any init


def test_nanmedian0_equals_numpy_nanmedian():
    """The detector's median (a sort instead of numpy's masked-array path) gives numpy's figures exactly."""
    import warnings

    from gradwatch.core.checks.base import nanmedian0

    rng = np.random.default_rng(0)
    for _ in range(500):
        r, c = int(rng.integers(1, 12)), int(rng.integers(1, 30))
        a = rng.standard_normal((r, c)) * 10.0 ** rng.integers(-5, 5, (r, c))
        for value, share in ((np.nan, 0.3), (np.inf, 0.05), (-np.inf, 0.05)):
            a[rng.random((r, c)) < share] = value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "All-NaN slice"
            expected = np.nanmedian(a, axis=0)
        np.testing.assert_array_equal(nanmedian0(a), expected)
