"""Keras 3 on the JAX and PyTorch backends: the gradients ``fit()`` applies, as on TensorFlow.

Both backends end a train step with the optimizer's ``apply`` (JAX: inside ``stateless_apply``, in the jitted
step; torch: eagerly, under ``no_grad``), so the same instance-level wrapper of ``apply`` sees the real
gradients with no extra pass. What differs is where the figures go:

- **JAX**: the wrapper is traced into the jitted step. A ``keras.Variable`` assigned there would be silently
  dropped (only optimizer and model variables are threaded through the step), so each collected step's
  ``(P, 5)`` row leaves the step through ``jax.debug.callback``, tagged with its step number (the optimizer's
  ``iterations``), and waits on the host; a drain runs ``jax.effects_barrier()`` once. The weights before the
  update are the step's inputs, so update ratios cost no copy. Under ``keras.distribution.DataParallel`` the
  gradients are already global; each step is kept once.
- **torch**: eager, so the wrapper runs the PyTorch adapter's fused kernels (``torch._foreach_norm``) and keeps
  the rows on the device until a drain copies them in one transfer.

Activations are sampled on both, on the steps the TensorFlow adapter samples: the ``call`` of the watched layers
is wrapped, and recurrent layers' inputs (and sequence outputs) get an identity whose gradient records the
gradient's norm at each time step. On JAX the sampled step is known inside the jitted step from the optimizer's
``iterations`` in the train step's state, the figures leave it through ``jax.debug.callback`` inside a
``lax.cond``, and the identity is a ``jax.custom_vjp`` tied to one of the layer's weights (so the backward pass
reaches it even when its input is the data). On torch it is an autograd hook.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch.adapters.keras import _RING, KerasAdapter, _ActTarget
from gradwatch.core.stats import DEAD_UNIT_SAMPLES, STAT_NAMES, ActivationRows, time_decades

__all__ = ["KerasJaxAdapter", "KerasTorchAdapter", "keras_adapter"]

_P = len(STAT_NAMES)


class KerasJaxAdapter(KerasAdapter):
    """Keras 3 on JAX (see the module docs)."""

    backend = "jax"

    def _make_rings(self) -> None:
        self._host: dict[int, np.ndarray] = {}  # step -> (P, 5) row from the jitted step
        self._host_total = self._step
        self._offset = 0
        self._drained = self._step  # the last step id (the optimizer's, before any loss-scale mapping) drained
        self._outer_steps = self._finite = 0  # with a LossScaleOptimizer: steps seen, steps applied
        self._true_step: dict[int, int] = {}
        self._count = 0  # "installed"; the rows wait in self._host
        self._dropped = 0

    def _install_activations(self) -> None:
        """Wrap ``model.train_step(state, data)`` (it reads the step from the optimizer's ``iterations`` in
        ``state``, at trace time) and the ``call`` of the watched layers: on sampled steps (a ``lax.cond``) their
        figures leave the jitted step through ``jax.debug.callback``."""
        import jax.numpy as jnp

        model = self.model
        if "train_step" in model.__dict__:
            self._notes.append("Activations are not sampled: model.train_step is already replaced on the instance.")
            return
        opt = model.optimizer
        slot = next((k for k, v in enumerate(opt.variables) if v is opt.iterations), None)
        if slot is None:
            self._notes.append("Activations are not sampled: the optimizer's step counter is not among its "
                               "variables.")
            return
        original_step = model.train_step
        adapter, every = self, self.activation_every

        def begin(state):
            step = jnp.asarray(state[2][slot], jnp.int32) + 1 + adapter._offset
            return jnp.logical_or(step == 1, step % every == 0), step

        begin_g = self.guard(begin, "Keras (JAX) train_step")

        def train_step(state, data):
            adapter._local.trace = begin_g(state) if adapter.active else None
            try:
                return original_step(state, data)
            finally:
                adapter._local.trace = None

        self._acts: dict[int, dict[int, np.ndarray]] = {}
        self._fired: dict[int, dict[int, np.ndarray]] = {}
        self._times: dict[int, dict[tuple[int, str], np.ndarray]] = {}
        self._alive: dict[int, list[np.ndarray]] = {}
        self._wrap_step_and_layers(train_step, self._wrap_call)

    def _wrap_call(self, target: _ActTarget):
        import jax
        import jax.numpy as jnp

        original = target.layer.call
        adapter = self
        where = f"Keras (JAX) activations of {target.layer.name}"
        li = target.index
        on_act = self.guard(self._on_act, where)
        on_time = self.guard(self._on_time, where)

        def record(y, sample, step):
            y = jax.lax.stop_gradient(y)

            def send():
                stats, fired = _jax_activation_stats(y, target)
                jax.debug.callback(on_act, step, li, stats, fired)

            jax.lax.cond(sample, send, lambda: None)

        def probe(x, sample, step, side):
            anchor = jnp.ravel(target.anchor.value)[:1].astype(x.dtype)

            @jax.custom_vjp
            def ident(x, a):
                return x

            def fwd(x, a):
                return x, a

            def bwd(a, g):
                def send():
                    per_t = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=(0, 2)))
                    jax.debug.callback(on_time, step, li, side, per_t[::-1] if target.backwards else per_t)

                jax.lax.cond(sample, send, lambda: None)
                return g, jnp.zeros_like(a)

            ident.defvjp(fwd, bwd)
            # The anchor (a weight of the layer) puts the input on the path of the gradient fit() computes, even
            # when it is the model's input; its gradient through the identity is zero.
            return ident(x, anchor)

        record_g, probe_g = self.guard(record, where), self.guard(probe, where)

        def call(*args, **kwargs):
            trace = getattr(adapter._local, "trace", None)
            if trace is None or not adapter.active:
                return original(*args, **kwargs)
            sample, step = trace
            timed = target.time and target.anchor is not None and args and getattr(args[0], "ndim", 0) == 3
            if timed:
                x = probe_g(args[0], sample, step, "in")
                if x is not None:
                    args = (x, *args[1:])
            out = original(*args, **kwargs)
            y = out[0] if isinstance(out, (list, tuple)) else out
            if timed and getattr(y, "ndim", 0) == 3:
                probed = probe_g(y, sample, step, "out")
                if probed is not None:
                    out = probed if y is out else type(out)([probed, *out[1:]])
                    y = probed
            if hasattr(y, "dtype") and jnp.issubdtype(y.dtype, jnp.floating):
                record_g(y, sample, step)
            return out

        call.__gradwatch__ = True  # type: ignore[attr-defined]
        return call

    def _on_act(self, step: Any, li: Any, stats: Any, fired: Any) -> None:
        step, li = int(step), int(li)
        if step > self._step and len(self._acts) < _RING:
            self._acts.setdefault(step, {})[li] = np.asarray(stats, dtype=np.float64)
            self._fired.setdefault(step, {})[li] = np.asarray(fired, dtype=bool)

    def _on_time(self, step: Any, li: Any, side: Any, per_t: Any) -> None:
        step = int(step)
        if step > self._step and len(self._times) < _RING:
            self._times.setdefault(step, {})[(int(li), side)] = np.asarray(per_t, dtype=np.float64)

    def _drain_activations(self) -> ActivationRows | None:
        acts = getattr(self, "_acts", None)
        if self._table is None or acts is None or not (acts or self._times):
            return None
        steps = sorted(set(acts) | set(self._times))
        n = self._table.n_layers
        arr = np.full((len(steps), 4, n), np.nan)
        tdec = np.full((len(steps), n), np.nan)
        for r, step in enumerate(steps):
            for li, stats in acts.get(step, {}).items():
                sat, rms, nonfinite = stats
                arr[r, 0, li], arr[r, 2, li], arr[r, 3, li] = sat, rms, nonfinite
                fired = self._fired.get(step, {}).get(li)
                if fired is not None and fired.size:
                    seen = self._alive.setdefault(li, [])
                    if seen and seen[-1].shape != fired.shape:
                        seen.clear()
                    seen.append(fired)
                    del seen[:-DEAD_UNIT_SAMPLES]
                    if len(seen) >= DEAD_UNIT_SAMPLES:  # dead: fired on no input of the last sampled batches
                        arr[r, 1, li] = float(np.mean(~np.any(np.stack(seen), axis=0)))
            times = self._times.get(step, {})
            for (li, side), per_t in times.items():
                if side == "in":
                    tdec[r, li] = _time_difference(per_t, times.get((li, "out")))
        self._acts, self._fired, self._times = {}, {}, {}
        return ActivationRows(steps=np.asarray(steps, dtype=np.int64), saturation=arr[:, 0], dead=arr[:, 1],
                              rms=arr[:, 2], nonfinite=arr[:, 3], time_decades=tdec)

    def _on_host(self, step: Any, row: Any) -> None:
        """Runs on the host when a step's row arrives (out of the jitted step)."""
        step = int(step)
        if step <= self._drained or step in self._host:
            return  # already drained, or a copy (one per device under data parallelism)
        if len(self._host) >= _RING:
            self._dropped += 1
            return
        self._host[step] = np.asarray(row, dtype=np.float64)
        self._host_total = max(self._host_total, step)

    def _wrap_apply(self, inner: Any, outer: Any) -> None:
        import jax
        import jax.numpy as jnp

        self._index = {id(v): i for i, v in enumerate(self._vars)}
        self._inner, self._outer = inner, outer
        p, every, update_every = self._table.n_params, self.every, self.update_every
        on_host = self.guard(self._on_host, "Keras (JAX) step callback")
        adapter = self

        # Steps count from this watch's start, as on TensorFlow: the optimizer's counter may carry earlier fits.
        offset = self._step - int(np.asarray(inner.iterations.value))
        self._offset = offset

        def measure(grads, trainable_variables):
            variables = self._variables(trainable_variables)
            pos = [self._index.get(id(v)) for v in variables]
            before = [v.value for v in variables]
            step = jnp.asarray(inner.iterations.value, jnp.int32) + 1 + offset
            return grads, variables, step, pos, before

        def record(grads, variables, step, pos, before):
            nan = jnp.full((_P,), jnp.nan, jnp.float32)
            cols = [nan] * p
            collected = (step - 1) // every
            measured = jnp.equal(collected % update_every, 0)
            for g, v, b, i in zip(grads, variables, before, pos):
                if i is None or g is None:
                    continue
                g32 = jnp.ravel(g).astype(jnp.float32)
                b32 = jnp.ravel(b).astype(jnp.float32)
                upd = jnp.ravel(v.value).astype(jnp.float32) - b32
                wn = jnp.where(measured, jnp.linalg.norm(b32), jnp.nan)
                un = jnp.where(measured, jnp.linalg.norm(upd), jnp.nan)
                cols[i] = jnp.stack([jnp.linalg.norm(g32), jnp.max(jnp.abs(g32)),
                                     jnp.sum(~jnp.isfinite(g32)).astype(jnp.float32), wn, un])
            row = jnp.stack(cols)
            send = lambda: jax.debug.callback(on_host, step, row)  # noqa: E731
            if every > 1:
                jax.lax.cond(jnp.equal((step - 1) % every, 0), send, lambda: None)
            else:
                send()

        self._wrap_inner_apply(inner, measure, record, "Keras (JAX) optimizer.apply")
        self._installed_on = inner
        if outer is not None:
            # The inner apply runs on finite steps only, numbered by the inner counter: the outer step says, in
            # order, which steps were finite, so rows get their true step and skipped steps are known.
            outer_original = type(outer).stateless_apply
            on_outer = self.guard(self._on_outer, "Keras (JAX) loss-scale step")

            def outer_stateless_apply(optimizer_variables, grads, trainable_variables):
                if adapter.active:
                    jax.debug.callback(on_outer, outer.check_finite(grads), ordered=True)
                return outer_original(outer, optimizer_variables, grads, trainable_variables)

            outer_stateless_apply.__gradwatch__ = True  # type: ignore[attr-defined]
            outer.stateless_apply = outer_stateless_apply
            self._wrapped.append(outer)

    def _on_outer(self, finite: Any) -> None:
        self._outer_steps += 1
        if bool(finite):
            self._finite += 1
            self._true_step[self._finite + self._offset] = self._outer_steps + self._offset

    def _read_rows(self) -> tuple[np.ndarray, np.ndarray, int]:
        import jax

        jax.effects_barrier()  # the rows of steps already dispatched: one wait per drain, none per step
        if self._dropped:
            self._notes.append(f"{self._dropped} steps arrived after {_RING} others were waiting; use a smaller "
                               "flush_every.")
            self._dropped = 0
        rows, self._host = self._host, {}
        total = self._host_total
        self._drained = max(rows, default=self._drained)
        if self._outer is not None:  # inner step ids -> true steps; the steps in between were skipped
            rows = {self._true_step.get(k, k): v for k, v in rows.items()}
            self._true_step = {k: v for k, v in self._true_step.items() if v > max(rows, default=self._step)}
            total = self._outer_steps + self._offset
        if not rows:
            return np.zeros((0, self._table.n_params, _P)), np.zeros(0, np.int64), max(total, self._step)
        steps = np.asarray(sorted(rows), dtype=np.int64)
        return np.stack([rows[s] for s in steps]), steps, max(total, int(steps[-1]))


class KerasTorchAdapter(KerasAdapter):
    """Keras 3 on PyTorch (see the module docs)."""

    backend = "torch"

    def _make_rings(self) -> None:
        self._rows_dev: list[tuple[int, Any]] = []
        self._total_py = self._step
        self._count = 0
        self._act_rows: list[tuple[int, dict[int, Any], dict[int, Any]]] = []
        self._sample: tuple[dict, dict] | None = None
        self._alive: dict[int, list] = {}

    def _wrap_apply(self, inner: Any, outer: Any) -> None:
        import torch

        self._index = {id(v): i for i, v in enumerate(self._vars)}
        self._inner, self._outer = inner, outer
        p, adapter = self._table.n_params, self
        f32 = torch.float32

        def measure(grads, trainable_variables):
            variables = self._variables(trainable_variables)
            step = adapter._total_py + (0 if outer is not None else 1)
            if (step - 1) % adapter.every:
                return None
            measured = adapter._count % adapter.update_every == 0
            pos = [adapter._index.get(id(v)) for v in variables]
            have = [(g, v, i) for g, v, i in zip(grads, variables, pos) if i is not None and g is not None]
            gs = [g for g, _, _ in have]
            l2 = torch.stack(torch._foreach_norm(gs, 2, dtype=f32)) if gs else None
            mx = nf = None
            if gs:  # every collected step, as the TensorFlow adapter does: max |g| and the non-finite count
                mx = torch.stack(torch._foreach_norm(gs, math.inf, dtype=f32))
                nf = torch.stack(torch._foreach_norm(torch._foreach_mul(gs, 0.0), 0, dtype=f32))
            before = torch._foreach_mul([v.value.detach() for _, v, _ in have], 1.0) if gs and measured else None
            return step, have, l2, mx, nf, before

        @torch.no_grad()
        def record(step, have, l2, mx, nf, before):
            device = l2.device if l2 is not None else None
            row = torch.full((p, _P), float("nan"), device=device)
            if have:
                idx = torch.tensor([i for _, _, i in have], device=device)
                row[idx, 0] = l2
                if mx is not None:
                    row[idx, 1], row[idx, 2] = mx, nf
                if before is not None:
                    now = [v.value.detach() for _, v, _ in have]
                    row[idx, 3] = torch.stack(torch._foreach_norm(before, 2, dtype=f32))
                    row[idx, 4] = torch.stack(torch._foreach_norm(torch._foreach_sub(now, before), 2, dtype=f32))
            adapter._rows_dev.append((step, row))
            adapter._count += 1

        def count() -> None:  # without a loss scaler, every applied step is a step
            adapter._total_py += 1

        self._wrap_inner_apply(inner, measure, record, "Keras (torch) optimizer.apply",
                               after=count if outer is None else None)
        if outer is not None:
            outer_original = type(outer).apply

            def outer_apply(grads, trainable_variables=None):
                adapter._total_py += 1  # every step, applied or skipped for overflow
                return outer_original(outer, grads, trainable_variables)

            outer_apply.__gradwatch__ = True  # type: ignore[attr-defined]
            outer.apply = outer_apply
            self._wrapped.append(outer)
        self._installed_on = inner

    def _read_rows(self) -> tuple[np.ndarray, np.ndarray, int] | None:
        import torch

        rows, self._rows_dev = self._rows_dev, []
        if not rows:
            return np.zeros((0, self._table.n_params, _P)), np.zeros(0, np.int64), self._total_py
        values = torch.stack([r for _, r in rows]).cpu().numpy().astype(np.float64)  # one transfer
        return values, np.asarray([s for s, _ in rows], dtype=np.int64), self._total_py

    # -- activations (eager) ---------------------------------------------------------------------------------

    def _install_activations(self) -> None:
        model = self.model
        if getattr(model, "jit_compile", False):
            self._notes.append("Activations are not sampled under jit_compile=True on the torch backend (hooks "
                               "inside torch.compile would force graph breaks); gradients are judged in full.")
            return
        if "train_step" in model.__dict__:
            self._notes.append("Activations are not sampled: model.train_step is already replaced on the instance.")
            return
        original_step = model.train_step
        adapter = self

        def train_step(*args, **kwargs):
            step = adapter._total_py + 1
            every = adapter.activation_every
            if adapter.active and (step == 1 or step % every == 0):
                adapter._sample = ({}, {})
            try:
                return original_step(*args, **kwargs)
            finally:
                if adapter._sample is not None:
                    sat, grads = adapter._sample
                    adapter._sample = None
                    if sat or grads:
                        adapter._act_rows.append((step, sat, grads))

        self._wrap_step_and_layers(train_step, self._wrap_call)

    def _wrap_call(self, target: _ActTarget):
        import torch

        original = target.layer.call
        adapter = self
        where = f"Keras (torch) activations of {target.layer.name}"

        def probe(x, grads, key):
            """``x`` (batch, time, features), with a hook that keeps the gradient's norm at each time step."""
            if not torch.is_grad_enabled():
                return x
            if not x.requires_grad:
                # A zero that requires grad makes the input a node of the graph without changing its value.
                x = x + torch.zeros((), device=x.device, dtype=x.dtype, requires_grad=True)

            def on_grad(g):
                per_t = g.detach().float().pow(2).sum(dim=(0, 2)).sqrt()
                grads[key] = per_t.flip(0) if target.backwards else per_t

            x.register_hook(adapter.guard(on_grad, where))
            return x

        def record(out, sat):
            y = out[0] if isinstance(out, (list, tuple)) else out
            if isinstance(y, torch.Tensor) and y.is_floating_point() and target.index not in sat:
                sat[target.index] = self._activation_stats(y.detach().float(), target)

        probe_g, record_g = self.guard(probe, where), self.guard(record, where)

        def call(*args, **kwargs):
            sample = adapter._sample
            if sample is None or not adapter.active:
                return original(*args, **kwargs)
            sat, grads = sample
            timed = target.time and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3 and \
                (target.index, "in") not in grads
            if timed:
                x = probe_g(args[0], grads, (target.index, "in"))
                if x is not None:
                    args = (x, *args[1:])
            out = original(*args, **kwargs)
            y = out[0] if isinstance(out, (list, tuple)) else out
            if timed and isinstance(y, torch.Tensor) and y.dim() == 3:
                # return_sequences: the loss reaches every output step, so the profile the layer receives is
                # measured too and only the fading the layer adds is judged (as on TensorFlow).
                probed = probe_g(y, grads, (target.index, "out"))
                if probed is not None:
                    out = probed if y is out else type(out)([probed, *out[1:]])
            with torch.no_grad():
                record_g(out, sat)
            return out

        call.__gradwatch__ = True  # type: ignore[attr-defined]
        return call

    def _activation_stats(self, y, target: _ActTarget):
        import torch

        from gradwatch.adapters.keras import _DEAD_ACTS, _SATURATION

        nan = torch.tensor(float("nan"), device=y.device)
        rms = y.pow(2).mean().sqrt()
        nonfinite = (~torch.isfinite(y)).sum().float()
        sat = dead = nan
        act = target.activation
        if act in _SATURATION:
            lo, hi = _SATURATION[act]
            sat = ((y < lo) | (y > hi)).float().mean()
        if act in _DEAD_ACTS and y.dim() >= 2:
            units = y.movedim(1, -1) if target.channels_first and y.dim() > 2 else y
            fired = (units.reshape(-1, units.shape[-1]) > 0).any(dim=0)
            seen = self._alive.setdefault(target.index, [])
            if seen and seen[-1].shape != fired.shape:
                seen.clear()
            seen.append(fired)
            del seen[:-DEAD_UNIT_SAMPLES]
            dead = (~torch.stack(seen).any(dim=0)).float().mean() if len(seen) >= DEAD_UNIT_SAMPLES else nan
        return torch.stack([sat, dead, rms, nonfinite])

    def _drain_activations(self) -> ActivationRows | None:
        if not self._act_rows or self._table is None:
            return None
        import torch

        rows, self._act_rows = self._act_rows, []
        n = self._table.n_layers
        arr = np.full((len(rows), 4, n), np.nan)
        tdec = np.full((len(rows), n), np.nan)
        for r, (_, sat, grads) in enumerate(rows):
            if sat:
                keys = sorted(sat)
                arr[r][:, keys] = torch.stack([sat[k] for k in keys]).cpu().numpy().T
            for (li, side), per_t in grads.items():
                if side == "in":
                    out = grads.get((li, "out"))
                    tdec[r, li] = _time_difference(per_t.cpu().numpy(), None if out is None else out.cpu().numpy())
        return ActivationRows(steps=np.asarray([s for s, _, _ in rows], dtype=np.int64), saturation=arr[:, 0],
                              dead=arr[:, 1], rms=arr[:, 2], nonfinite=arr[:, 3], time_decades=tdec)



def _time_difference(into: np.ndarray, out: np.ndarray | None) -> float:
    """How many decades the gradient fades through a recurrent layer: at its input, less what it already had at
    its output when it returns sequences (the loss reaches every output step), as the TensorFlow adapter does."""
    a = time_decades(into)
    b = time_decades(out) if out is not None else math.nan
    return a - b if math.isfinite(a) and math.isfinite(b) else a


def _jax_activation_stats(y: Any, target: _ActTarget):
    """``[saturation, rms, nonfinite]`` of one activation output and which units fired, in the jitted step."""
    import jax.numpy as jnp

    from gradwatch.adapters.keras import _DEAD_ACTS, _SATURATION

    y = y.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(y)))
    nonfinite = jnp.sum(~jnp.isfinite(y)).astype(jnp.float32)
    sat = jnp.float32(jnp.nan)
    if target.activation in _SATURATION:
        lo, hi = _SATURATION[target.activation]
        sat = jnp.mean(((y < lo) | (y > hi)).astype(jnp.float32))
    fired = jnp.zeros((0,), bool)
    if target.activation in _DEAD_ACTS and y.ndim >= 2:
        units = jnp.moveaxis(y, 1, -1) if target.channels_first and y.ndim > 2 else y
        fired = jnp.any(units.reshape(-1, units.shape[-1]) > 0, axis=0)
    return jnp.stack([sat, rms, nonfinite]), fired


def keras_adapter() -> type[KerasAdapter]:
    """The adapter for the backend Keras runs on (fixed at import). A backend gradwatch cannot serve gets the
    TensorFlow adapter, which refuses it with a clear error when it is made."""
    import keras

    return {"jax": KerasJaxAdapter, "torch": KerasTorchAdapter}.get(keras.backend.backend(), KerasAdapter)
