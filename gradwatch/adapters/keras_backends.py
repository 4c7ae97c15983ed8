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

Activations are sampled on the torch backend (the layers' ``call`` wrapped on sampled steps, an autograd hook
on recurrent layers' inputs for the gradient through time). On JAX a layer's forward cannot read the step
number without adding a variable to the model, so activations are not sampled there, and the report says so.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch.adapters.keras import _RING, KerasAdapter, _ActTarget
from gradwatch.core.stats import DEAD_UNIT_SAMPLES, STAT_NAMES, ActivationRows, time_decades

__all__ = ["KerasJaxAdapter", "KerasTorchAdapter"]

_P = len(STAT_NAMES)


class KerasJaxAdapter(KerasAdapter):
    """Keras 3 on JAX (see the module docs)."""

    backend = "jax"

    def _make_rings(self) -> None:
        self._host: dict[int, np.ndarray] = {}  # step -> (P, 5) row from the jitted step
        self._host_total = self._step
        self._count = 0  # "installed"; the rows wait in self._host
        self._dropped = 0

    def _install_activations(self) -> None:
        self._notes.append("Activations (saturation, dead units, RNN gradient through time) are not sampled on the "
                           "JAX backend: a layer's jitted forward cannot know the step without a new model "
                           "variable. Gradients and updates are judged in full.")

    def _on_host(self, step: Any, row: Any) -> None:
        """Runs on the host when a step's row arrives (out of the jitted step)."""
        step = int(step)
        if step <= self._step or step in self._host:
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
        original = type(inner).apply
        p, every, update_every = self._table.n_params, self.every, self.update_every
        on_host = self.guard(self._on_host, "Keras (JAX) step callback")
        adapter = self

        def measure(grads, variables):
            pos = [self._index.get(id(v)) for v in variables]
            before = [v.value for v in variables]
            step = jnp.asarray(inner.iterations.value, jnp.int32) + 1
            return step, pos, before

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

        measure_g = self.guard(measure, "Keras (JAX) optimizer.apply")
        record_g = self.guard(record, "Keras (JAX) optimizer.apply")

        def apply(grads, trainable_variables=None):
            grads = list(grads)
            variables = list(trainable_variables) if trainable_variables is not None else \
                list(inner._trainable_variables)
            state = measure_g(grads, variables) if adapter.active else None
            result = original(inner, grads, trainable_variables)
            if state is not None and adapter.active:
                record_g(grads, variables, *state)
            return result

        apply.__gradwatch__ = True  # type: ignore[attr-defined]
        inner.apply = apply
        self._wrapped.append(inner)
        self._installed_on = inner
        if outer is not None:
            self._notes.append("Mixed precision on JAX: steps the LossScaleOptimizer skipped for overflow are not "
                               "seen (its inner apply runs only on finite steps); the others are judged unscaled.")

    def _read_rows(self) -> tuple[np.ndarray, np.ndarray, int] | None:
        import jax

        jax.effects_barrier()  # the rows of steps already dispatched: one wait per drain, none per step
        if self._dropped:
            self._notes.append(f"{self._dropped} steps arrived after {_RING} others were waiting; use a smaller "
                               "flush_every.")
            self._dropped = 0
        rows, self._host = self._host, {}
        if not rows:
            return None
        steps = np.asarray(sorted(rows), dtype=np.int64)
        return np.stack([rows[s] for s in steps]), steps, max(self._host_total, int(steps[-1]))


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
        original = type(inner).apply
        p, adapter = self._table.n_params, self
        f32 = torch.float32

        def measure(grads, variables):
            step = adapter._total_py + (0 if outer is not None else 1)
            if (step - 1) % adapter.every:
                return None
            measured = adapter._count % adapter.update_every == 0
            pos = [adapter._index.get(id(v)) for v in variables]
            have = [(g, v, i) for g, v, i in zip(grads, variables, pos) if i is not None and g is not None]
            gs = [g for g, _, _ in have]
            l2 = torch.stack(torch._foreach_norm(gs, 2, dtype=f32)) if gs else None
            mx = nf = None
            if gs and measured:
                mx = torch.stack(torch._foreach_norm(gs, math.inf, dtype=f32))
                nf = torch.stack(torch._foreach_norm(torch._foreach_mul(gs, 0.0), 0, dtype=f32))
            before = torch._foreach_mul([v.value.detach() for _, v, _ in have], 1.0) if gs and measured else None
            return step, have, l2, mx, nf, before

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

        measure_g = self.guard(measure, "Keras (torch) optimizer.apply")
        record_g = self.guard(record, "Keras (torch) optimizer.apply")

        def apply(grads, trainable_variables=None):
            grads = list(grads)
            variables = list(trainable_variables) if trainable_variables is not None else \
                list(inner._trainable_variables)
            state = measure_g(grads, variables) if adapter.active else None
            result = original(inner, grads, trainable_variables)
            if outer is None:
                adapter._total_py += 1
            if state is not None and adapter.active:
                with torch.no_grad():
                    record_g(*state)
            return result

        apply.__gradwatch__ = True  # type: ignore[attr-defined]
        inner.apply = apply
        self._wrapped.append(inner)
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

        train_step.__gradwatch__ = True  # type: ignore[attr-defined]
        model.__dict__["train_step"] = train_step
        self._wrapped.append(model)
        for target in self._act_targets:
            if "call" in target.layer.__dict__:
                self._notes.append(f"Activations of {target.layer.name} are not sampled: its call() is already "
                                   "replaced on the instance.")
                continue
            target.layer.__dict__["call"] = self._wrap_call(target)
            self._wrapped.append(target.layer)

    def _wrap_call(self, target: _ActTarget, ring: Any = None):
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
            if target.activation is not None:
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
                    into = time_decades(per_t.cpu().numpy())
                    out = grads.get((li, "out"))
                    out = time_decades(out.cpu().numpy()) if out is not None else math.nan
                    tdec[r, li] = into - out if math.isfinite(into) and math.isfinite(out) else into
        return ActivationRows(steps=np.asarray([s for s, _, _ in rows], dtype=np.int64), saturation=arr[:, 0],
                              dead=arr[:, 1], rms=arr[:, 2], nonfinite=arr[:, 3], time_decades=tdec)

