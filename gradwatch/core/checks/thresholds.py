"""The detector's cut-offs, each with where it comes from."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Thresholds"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """The detector's cut-offs. Each default names where it comes from.

    Args:
        vanishing_decades: A weight layer whose gradient RMS is this many orders of magnitude below the
            output side vanishes. AUTOTRAINER flags a first/last-layer gradient-norm ratio below 1e-3.
        exploding_decades: A weight layer whose gradient RMS is this many orders of magnitude above the
            output side explodes. AUTOTRAINER uses a ratio of 70; a whole 1e3 keeps healthy deep nets silent.
        update_ratio_vanishing: An early layer's ``||dw||/||w||`` below this is too slow. TheDeepChecker
            calls log10 ratios below -4 too slow; Karpathy's rule of thumb puts healthy near 1e-3.
        update_ratio_learning: The output side counts as still learning (not converged) above this.
        slow_update_decades: A too-slow layer (``update_ratio_vanishing``) counts as vanishing only when its
            gradient is also at least this many orders of magnitude below the output side's, so a layer that
            merely has large weights is not called vanishing.
        update_ratio_exploding: Updates this large relative to the weights per step are runaway, when most weight
            layers' are (one layer alone, such as an output layer on its first step, is not).
            TheDeepChecker calls log10 ratios above -1 too fast; 1.0 is ten times past that.
        growth_decades: Total gradient norm growing by this many orders of magnitude over ``trend_window``
            collected steps, rising on at least ``rising_fraction`` of them, is exploding. TheDeepChecker
            flags every ratio >= 2 over 5 steps (x32, 1.5 decades).
        trend_window: Steps the growth trend is judged over.
        rising_fraction: Fraction of step-to-step ratios that must be rising.
        grad_rms_exploding: Gradient RMS above this is exploding whatever the profile. TheDeepChecker: 1e6.
        window: Collected steps a finding is judged over.
        on_fraction: A finding starts when its condition held on this fraction of ``window``.
        off_fraction: It ends when its condition held on no more than this fraction of ``window``.
        skip_fraction: AMP overflow skips on this fraction of ``window`` steps is persistent, not calibration.
        saturation_fraction: Fraction of saturated sigmoid/tanh units that counts as saturation.
        dead_fraction: Fraction of a layer's ReLU units that stayed zero on every input of the last
            :data:`~gradwatch.core.stats.DEAD_UNIT_SAMPLES` sampled batches that counts as dead units.
        activation_window: Activation samples (taken every ``activation_every`` steps) a saturation or
            dead-unit finding is judged over.
        time_decades: Input gradient falling this many orders of magnitude from the last to the first
            time step is vanishing through time (Bengio et al. 1994); rising that much is exploding.
        gated_time_decades: A gated cell (LSTM, GRU) whose input gradient falls this many orders of magnitude
            through time on most of ``gated_time_window`` samples cannot carry its memory. Measured on the 60-step
            memory task (Adam): an LSTM with forget-gate bias 0 fades 10-12 decades while its loss stays at chance
            (0.67-0.70) and starts to learn once the fade drops below about 4; with bias 1 it starts at 4 and
            learns (Gers et al. 2000 and Jozefowicz et al. 2015 set the bias to 1).
        gated_time_window: Activation samples a gated cell's fade must persist over (recurrent layers are
            sampled at steps 1 and 2, then every ``activation_every``: at the default 25, 5 of 6 samples is about
            75 steps): a gated cell fades while its gates learn, so a fade that lifts within a few samples is
            learning, not a fault.
        sustained_growth_decades: The total gradient norm's median over the last ``window`` steps this many
            orders of magnitude above its median over the first ``window`` steps is exploding, however slowly it
            grew (a slow divergence never shows ``growth_decades`` within ``trend_window``).
        burst_decades: The total gradient norm this many orders of magnitude above its median over the first
            steps, on ``burst_steps`` collected steps in a row, is exploding at once, without waiting for the
            window: a divergence goes from there to inf within a step or two (LLaMA under SGD at lr 3: a median of
            ~2 over the first steps, 6.9e3 at step 9, 9e10 at step 10, NaN at step 11), while one noisy step (a
            single 1e5x gradient) stays no finding. A Keras CNN under Adam at lr 0.1: 1.45 at step 1, 1.5e6 at
            step 2, 2.2e3 at step 3 (found), then its ReLUs die.
        burst_steps: Consecutive steps a burst must last.
        loss_growth_decades: Where the loss is known, its median over the last ``window`` steps this many orders of
            magnitude above its median over the first ``window`` is exploding: the run diverges even when the
            gradients stay bounded (the PyTorch word-language-model LSTM without clipping: loss 31 -> 398 over 400
            steps at a gradient norm near 6; a softmax keeps the gradient bounded while the logits blow up).
        adaptive_update_decades: Under an adaptive optimizer, a layer whose gradient vanishes is called vanishing
            only when its update ratio is also this many orders of magnitude below its reference's: Adam is
            invariant to gradient scale (Kingma & Ba 2015), so a small gradient alone says nothing about learning.
        no_gradient_steps: A trainable layer whose gradient is exactly zero on this many consecutive steps gets no
            gradient at all.
        time_extreme_factor: Growth through time of ``time_extreme_factor * time_decades`` is reported on its
            first sample, without waiting for the window: one update of that size can wreck the recurrent
            weights before the next sample (Pascanu et al. 2013).
    """

    vanishing_decades: float = 3.0
    exploding_decades: float = 3.0
    update_ratio_vanishing: float = 1e-5
    update_ratio_learning: float = 1e-3
    slow_update_decades: float = 1.0
    update_ratio_exploding: float = 1.0
    growth_decades: float = 1.5
    trend_window: int = 6
    rising_fraction: float = 0.8
    grad_rms_exploding: float = 1e6
    window: int = 10
    on_fraction: float = 0.7
    off_fraction: float = 0.2
    skip_fraction: float = 0.8
    saturation_fraction: float = 0.5
    dead_fraction: float = 0.5
    time_decades: float = 2.0
    gated_time_decades: float = 6.0
    gated_time_window: int = 6
    sustained_growth_decades: float = 2.0
    loss_growth_decades: float = 1.0
    burst_decades: float = 3.0
    burst_steps: int = 2
    adaptive_update_decades: float = 1.0
    no_gradient_steps: int = 10
    time_extreme_factor: float = 2.0
    activation_window: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"Thresholds.window must be an int >= 2, received window={self.window!r}")
        if not 0 <= self.off_fraction < self.on_fraction <= 1:
            raise ValueError("Thresholds need 0 <= off_fraction < on_fraction <= 1, received "
                             f"off_fraction={self.off_fraction!r}, on_fraction={self.on_fraction!r}")
