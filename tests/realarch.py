"""The harness of the real-architecture suite: one training loop that trains a model with gradwatch attached and
records, with plain PyTorch, what labels each case and what the published rule sets read.

Plain measurements per step: the loss, the total gradient norm (``torch.nn.utils.get_total_norm``), whether any
gradient is non-finite, whether every gradient is exactly zero, the gradient norm of the first and last weight
kernels, the mean |dW| of every Linear layer, the fraction of exactly-zero gradient entries, the share of ReLU
units that never fire in the batch, and the share of sigmoid/tanh pre-activations beyond |5|.

Two published rule sets are computed on these same runs (their rules as summarised in
``../shared/notes/detection.md``):

- AUTOTRAINER (Zhang et al., ICSE 2021): judged after 30% of training. gra_rate = ||g first kernel|| / ||g last
  kernel||; vanishing if gra_rate < 1e-3 and ||g first|| < 1e-4; exploding if gra_rate > 70 or the loss is NaN;
  dying ReLU if >= 70% of gradient entries are exactly 0. First repair: SELU for every problem (counted as an
  activation swap, i.e. ``relu``).
- DeepDiagnosis (Wardat et al., ICSE 2022): per epoch on the first batch (here: every step). Vanishing if a Linear
  layer's mean |dW| < 1e-7; numerical error (counted as ``nonfinite``) on NaN/inf; dead nodes if ReLU outputs are
  <= 0 for >= 70% of units; saturation if > 50% of sigmoid/tanh pre-activations have |x| >= 5. Fix chain: weight
  variance outside [1e-5, 10] -> init; lr*||dW||/||W|| outside [1e-5, 1e-1] -> learning rate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import gradwatch

#: What the suite calls a case's problem, and what each rule set says.
HEALTH = ("vanishing", "exploding", "nonfinite", "no_gradient")


@dataclass
class Run:
    """One training run: gradwatch's report and the plain measurements."""

    report: gradwatch.Report
    model: nn.Module | None = None
    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    first_nonfinite: int | None = None
    all_zero: bool = True
    first_kernel: list[float] = field(default_factory=list)
    last_kernel: list[float] = field(default_factory=list)
    min_linear_mean_abs: list[float] = field(default_factory=list)
    zero_fraction: list[float] = field(default_factory=list)
    dead_fraction: list[float] = field(default_factory=list)
    saturated_fraction: list[float] = field(default_factory=list)
    update_ratio: list[float] = field(default_factory=list)
    weight_var: list[float] = field(default_factory=list)

    @property
    def finite_norms(self) -> list[float]:
        return [n for n in self.norms if math.isfinite(n)]

    def loss_falls(self, factor: float = 0.9) -> bool:
        first, last = self.losses[:5], self.losses[-10:]
        return all(map(math.isfinite, last)) and sum(last) / len(last) < factor * sum(first) / len(first)

    def norm_growth_decades(self) -> float:
        """log10 of the largest total norm in the run over the median of its first 10 steps."""
        fin = self.finite_norms
        base = sorted(fin[:10])[len(fin[:10]) // 2]
        return math.log10(max(fin) / base) if base > 0 else math.inf

    def gradwatch_kinds(self) -> set[str]:
        return {f.kind for f in self.report.findings if f.kind in HEALTH}

    def gradwatch_fix(self) -> str | None:
        return self.report.recommendations[0].fix if self.report.recommendations else None


def _kernels(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]


def _activation_probes(model: nn.Module, dead: list, saturated: list) -> list:
    """Forward hooks on ReLU (dead units) and sigmoid/tanh (pre-activations beyond |5|) modules."""
    handles = []
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            def relu_hook(mod, args, out):
                units = out.detach().reshape(-1, out.shape[-1])
                dead.append(float((~(units > 0).any(dim=0)).float().mean()))
            handles.append(module.register_forward_hook(relu_hook))
        elif isinstance(module, (nn.Sigmoid, nn.Tanh)):
            def sat_hook(mod, args, out):
                saturated.append(float((args[0].detach().abs() >= 5).float().mean()))
            handles.append(module.register_forward_hook(sat_hook))
    return handles


def train(model: nn.Module, loss_of: Callable[[nn.Module, torch.Generator], torch.Tensor], *, steps: int,
          optimizer: str = "adamw", lr: float = 1e-3, warmup: int = 10, clip: float | None = None,
          momentum: float = 0.9, state: Callable | None = None) -> Run:
    """Train ``model`` for ``steps`` with gradwatch attached (silent), measuring as the module docs say.

    Args:
        loss_of: ``loss_of(model, generator)`` returns one batch's loss.
        optimizer: ``"adamw"`` (with linear warmup over ``warmup`` steps), ``"adam"`` or ``"sgd"`` (momentum).
        clip: Clip the total gradient norm at this value before each step (measured before clipping).
    """
    g = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    kernels = _kernels(model)
    linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    dead: list[float] = []
    saturated: list[float] = []
    handles = _activation_probes(model, dead, saturated)
    run = Run(report=None, model=model)  # type: ignore[arg-type]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gw = gradwatch.attach(model, opt, reporters=[])
            for step in range(1, steps + 1):
                opt.zero_grad()
                dead.clear()
                saturated.clear()
                loss = loss_of(model, g)
                loss.backward()
                gw.log_loss(loss)
                grads = [p.grad for p in params if p.grad is not None]
                with torch.no_grad():
                    norm = float(torch.nn.utils.get_total_norm(grads))
                    run.norms.append(norm)
                    if run.first_nonfinite is None and not math.isfinite(norm):
                        run.first_nonfinite = step
                    run.all_zero &= all(bool((gr == 0).all()) for gr in grads)
                    kg = [k.grad for k in kernels if k.grad is not None]
                    run.first_kernel.append(float(kg[0].norm()) if kg else math.nan)
                    run.last_kernel.append(float(kg[-1].norm()) if kg else math.nan)
                    run.min_linear_mean_abs.append(min((float(w.grad.abs().mean()) for w in linears
                                                        if w.grad is not None), default=math.nan))
                    total = sum(gr.numel() for gr in grads)
                    run.zero_fraction.append(sum(int((gr == 0).sum()) for gr in grads) / max(1, total))
                    run.dead_fraction.append(max(dead, default=math.nan))
                    run.saturated_fraction.append(max(saturated, default=math.nan))
                    before = [p.detach().clone() for p in kernels]
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                sched.step()
                with torch.no_grad():
                    w2 = sum(float(b.pow(2).sum()) for b in before)
                    d2 = sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(kernels, before))
                    run.update_ratio.append(math.sqrt(d2 / w2) if w2 > 0 else math.nan)
                    run.weight_var.append(min(float(b.var()) for b in before) if before else math.nan)
                run.losses.append(float(loss.detach()))
            gw.detach()
    finally:
        for h in handles:
            h.remove()
    run.report = gw.report()
    return run


# -- the published rule sets, on the same runs ---------------------------------------------------------------

def autotrainer(run: Run) -> tuple[set[str], str | None]:
    """AUTOTRAINER's verdict (problem kinds) and its first repair, mapped to gradwatch's fix names."""
    kinds: set[str] = set()
    start = int(len(run.losses) * 0.3)
    for i in range(start, len(run.losses)):
        first, last = run.first_kernel[i], run.last_kernel[i]
        rate = first / last if last > 0 else math.inf
        if math.isfinite(rate) and rate < 1e-3 and first < 1e-4:
            kinds.add("vanishing")
        if (math.isfinite(rate) and rate > 70) or math.isnan(run.losses[i]):
            kinds.add("exploding")
        if run.zero_fraction[i] >= 0.7:
            kinds.add("dead_units")
    # Its first repair for vanishing, exploding and dying ReLU alike is SELU: an activation swap.
    return kinds, ("relu" if kinds else None)


def deepdiagnosis(run: Run) -> tuple[set[str], str | None]:
    """DeepDiagnosis' verdict (problem kinds) and the first fix of its chain, mapped to gradwatch's fix names."""
    kinds: set[str] = set()
    for i in range(len(run.losses)):
        if run.min_linear_mean_abs[i] < 1e-7:
            kinds.add("vanishing")
        if not math.isfinite(run.norms[i]) or not math.isfinite(run.losses[i]):
            kinds.add("nonfinite")
        if run.dead_fraction[i] >= 0.7:
            kinds.add("dead_units")
        if run.saturated_fraction[i] > 0.5:
            kinds.add("saturation")
    if not kinds:
        return kinds, None
    var = min((v for v in run.weight_var if math.isfinite(v)), default=math.nan)
    if math.isfinite(var) and (var < 1e-5 or var > 10):
        return kinds, "he_init"  # "poor weights": re-initialise
    ur = [u for u in run.update_ratio if math.isfinite(u)]
    lr_off = any(u < 1e-5 or u > 1e-1 for u in ur)
    return kinds, ("lower_learning_rate" if lr_off else None)
