"""``gradwatch.trial``: run the top recommendations as short experiments and show which one cures the model.

It trains the model as given (the baseline), then, for each of the baseline's top recommendations (or the
``fixes`` named), a fresh model with that fix applied mechanically, on the same batches in the same order with the
random state restored, each watched by a silent gradwatch. The user's own model and optimizer are never touched.
"""

from __future__ import annotations

import math
import random
import sys
import weakref
from collections.abc import Sequence
from typing import Any

from gradwatch.core.report import Recommendation
from gradwatch.trials.result import TrialReport, TrialRun, final_loss, health_kinds
from gradwatch.trials.runs import Progress, candidates, check_common, finish

__all__ = ["TrialReport", "TrialRun", "trial"]

def trial(model_or_factory: Any, *args: Any, **kwargs: Any) -> TrialReport:
    """Train the model as given and, for each top recommendation, a copy with that fix applied; report which
    fixes cure it.

    PyTorch::

        trial(make_model, batches, loss_fn, make_optimizer, *, steps=200, fixes=None, top=3)

    Keras::

        trial(compiled_model, x, y, *, epochs=1, batch_size=32, fixes=None, top=3)

    Args:
        make_model: PyTorch: a function returning a fresh ``nn.Module`` each call (seeded as you seed it; the
            random state is restored before each call).
        batches: PyTorch: ``(input, target)`` pairs, as a re-iterable (a list, a ``DataLoader``) or a
            zero-argument function returning an iterator. Cycled when shorter than ``steps``.
        loss_fn: PyTorch: ``loss_fn(output, target)`` returns the loss tensor.
        make_optimizer: PyTorch: ``make_optimizer(params)`` returns the optimizer for those parameters.
        steps: PyTorch: training steps per run. Defaults to ``200``.
        model: Keras: a compiled model. It is cloned (``keras.models.clone_model``, its weights copied, the same
            optimizer config and loss); the original is not trained.
        x, y: Keras: the training data, as for ``fit()``.
        epochs, batch_size: Keras: as for ``fit()``. Default to ``1`` and ``32``.
        fixes: Fix names to try (as in :attr:`Recommendation.fix`) instead of the baseline's top
            recommendations. Defaults to ``None``.
        top: How many of the baseline's recommendations to try. Defaults to ``3``.
        wandb_run: The W&B run to log the table to. Defaults to the active ``wandb.run``, if any.

    Returns:
        A :class:`TrialReport`: ``.baseline``, ``.runs`` (one per fix, in order), ``.best`` (the cured run with the
        lowest final loss, or ``None``). ``str()`` is a table, ``.plot(path)`` draws the loss curves. On a terminal a
        progress bar runs meanwhile and the table is printed at the end; with an active W&B run the table is
        logged as ``gradwatch/trial``.

    Example:
        >>> import torch, gradwatch
        >>> from torch import nn
        >>> def make_model():
        ...     return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> data = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(4)]
        >>> result = gradwatch.trial(make_model, data, nn.functional.mse_loss,
        ...                          lambda p: torch.optim.SGD(p, lr=0.01), steps=20)
        >>> result.runs, result.best
        ((), None)
    """
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model_or_factory, keras.Model):
        from gradwatch.trials.keras import trial_keras

        return trial_keras(model_or_factory, *args, **kwargs)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model_or_factory, torch.nn.Module):
        raise TypeError(
            f"make_model must be a function that returns a fresh model on each call, received a "
            f"{type(model_or_factory).__name__} instance: each fix is tried on a new model, and yours is never "
            f"touched. Pass e.g. make_model=lambda: {type(model_or_factory).__name__}(...).")
    if not callable(model_or_factory):
        raise TypeError("trial() takes a PyTorch make_model function (returning a fresh nn.Module) or a compiled "
                        f"Keras model; received {type(model_or_factory).__name__}")
    return trial_torch(model_or_factory, *args, **kwargs)


# -- PyTorch ---------------------------------------------------------------------------------------------------

class _RandomState:
    """torch's (CPU and initialised CUDA devices), NumPy's and Python's random state, to restore."""

    def __init__(self) -> None:
        import numpy as np
        import torch

        self.torch = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.numpy = np.random.get_state()
        self.python = random.getstate()

    def restore(self) -> None:
        import numpy as np
        import torch

        torch.random.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


def trial_torch(make_model: Any, batches: Any = None, loss_fn: Any = None, make_optimizer: Any = None, *,
                steps: int = 200, fixes: Sequence[str] | None = None, top: int = 3,
                wandb_run: Any = None) -> TrialReport:
    import torch

    from gradwatch.trials import torch as fixes_torch

    for name, value, shape in (("loss_fn", loss_fn, "loss_fn(output, target) -> loss"),
                               ("make_optimizer", make_optimizer, "make_optimizer(params) -> optimizer")):
        if not callable(value):
            raise TypeError(f"{name} must be a function, {shape}; received {type(value).__name__}")
    if batches is None or not (callable(batches) or _reiterable(batches)):
        raise TypeError("batches must be a re-iterable of (input, target) pairs (a list, a DataLoader) or a "
                        "zero-argument function returning an iterator of them; received "
                        f"{type(batches).__name__}" + (" (an iterator can be read only once: pass a list, or "
                                                         "lambda: iter(...))" if _iterator(batches) else ""))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 (training steps per run), received steps={steps!r}")
    wanted = check_common(fixes, top)
    first = next(fixes_torch.batch_iterator(batches), None)
    if first is None:
        raise ValueError("batches is empty: it yielded no (input, target) pair")
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise TypeError(f"each batch must be an (input, target) pair; the first was a {type(first).__name__}"
                        + (f" of {len(first)}" if isinstance(first, (tuple, list)) else ""))

    start = _RandomState()
    made: list[weakref.ref] = []

    def fresh() -> torch.nn.Module:
        start.restore()
        model = make_model()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"make_model() must return a torch.nn.Module, returned {type(model).__name__}")
        if any(ref() is model for ref in made):
            raise ValueError("make_model() returned the same model instance twice: it must build a new one on "
                             "each call (e.g. def make_model(): return MyModel()), since each fix changes its model")
        made.append(weakref.ref(model))
        return model

    progress = Progress(steps * (1 + (len(wanted) if wanted else top)), "gradwatch trial: baseline")
    try:
        model = fresh()
        train_state = _RandomState()
        baseline = _train_torch(model, batches, loss_fn, make_optimizer, steps, None, train_state, progress)
        runs: list[TrialRun] = []
        if health_kinds(baseline.report):
            for rec in candidates(baseline.report, wanted, top):
                progress.label(f"gradwatch trial: {rec.fix}")
                model = fresh()
                try:
                    order = _order(model, first)
                    applied = fixes_torch.apply_fix(model, rec, order)
                except fixes_torch.NotApplicable as why:
                    runs.append(TrialRun(fix=rec.fix, layers=rec.layers, applied=False, reason=str(why)))
                    progress.advance(steps)
                    continue
                try:
                    run = _train_torch(model, batches, loss_fn, make_optimizer, steps, applied, train_state,
                                       progress)
                except Exception as exc:  # noqa: BLE001 - the fixed model failed to train: say so, do not fake it
                    run = TrialRun(fix=rec.fix, layers=rec.layers, applied=False,
                                   reason=f"training with the fix failed ({type(exc).__name__}: {exc})")
                else:
                    run = _with_fix(run, rec, applied.change)
                runs.append(run)
                del model
    finally:
        progress.close()
        start.restore()
    return finish("torch", steps, baseline, runs, wandb_run)


def _order(model, batch) -> list[str]:
    from gradwatch.trials.torch import layer_order

    was = model.training
    model.eval()  # no dropout draws, no batch-norm statistics updated
    try:
        return layer_order(model, batch)
    finally:
        model.train(was)


def _with_fix(run: TrialRun, rec: Recommendation, change: str) -> TrialRun:
    cured = math.isfinite(run.final_loss) and not run.findings
    return TrialRun(fix=rec.fix, layers=rec.layers, applied=True, change=change, cured=cured,
                    final_loss=run.final_loss, losses=run.losses, report=run.report)


def _train_torch(model, batches, loss_fn, make_optimizer, steps, applied, train_state, progress) -> TrialRun:
    import torch

    from gradwatch._watcher import Watcher
    from gradwatch.adapters.torch import TorchAdapter
    from gradwatch.trials.torch import batch_iterator

    opt = make_optimizer(model.parameters())
    if not isinstance(getattr(opt, "param_groups", None), list) or not callable(getattr(opt, "step", None)):
        raise TypeError(f"make_optimizer(params) must return a torch optimizer, returned {type(opt).__name__}")
    if applied is not None and applied.lr_factor:
        for group in opt.param_groups:
            group["lr"] = group["lr"] / applied.lr_factor
    train_state.restore()  # every run draws the same dropout masks and shuffles as the baseline
    losses: list[float] = []
    gw = Watcher.start(TorchAdapter, model, opt, {"reporters": []})  # gradwatch.attach, silent
    try:
        it = batch_iterator(batches)
        for _ in range(steps):
            batch = next(it, None)
            if batch is None:
                it = batch_iterator(batches)
                batch = next(it)
            x, y = batch
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            if applied is not None and applied.max_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=applied.max_norm)
            opt.step()
            gw.log_loss(loss)
            losses.append(float(loss.detach()))
            progress.advance()
    finally:
        gw.detach()
    losses_t = tuple(losses)
    return TrialRun(fix=None, losses=losses_t, final_loss=final_loss(losses_t), report=gw.report())


def _reiterable(obj: Any) -> bool:
    return hasattr(obj, "__iter__") and not _iterator(obj)


def _iterator(obj: Any) -> bool:
    return hasattr(obj, "__next__") and iter(obj) is obj
