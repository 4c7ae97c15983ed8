"""Keras 3 on the JAX and PyTorch backends: the gradients ``fit()`` applies, as on TensorFlow.

Both backends end a train step with the optimizer's ``apply`` (JAX: inside ``stateless_apply``, in the jitted
step; torch: eagerly, under ``no_grad``), so the same instance-level wrapper of ``apply`` sees the real
gradients with no extra pass. What differs is where the figures go:

- **JAX**: the wrapper is traced into the jitted step. A free ``keras.Variable`` assigned there would be silently
  dropped (only model and optimizer variables are threaded through the step), so the ring of rows is made of
  variables of the (inner) optimizer while gradwatch is attached: each collected step writes its ``(P, 5)`` row in
  the jitted step, and a drain reads the ring from the trainer's state once. (A ``jax.debug.callback`` per step,
  the earlier design, cost a 20-layer MLP +55%.) The optimizer's ``save_own_variables``/``load_own_variables``
  skip these variables, so checkpoints saved mid-``fit()`` hold only the optimizer's own state; they leave the
  optimizer at ``on_train_end``. The weights before the update are the step's inputs, so update ratios cost no
  copy. Under ``keras.distribution.DataParallel`` the gradients are already global.
- **torch**: eager, so the wrapper runs the PyTorch adapter's fused kernels (``torch._foreach_norm``) and keeps
  the rows on the device until a drain copies them in one transfer.

Activations are sampled on both, on the steps the TensorFlow adapter samples: the ``call`` of the watched layers is
wrapped, and recurrent layers' inputs (and sequence outputs) get an identity whose gradient records the gradient's
norm at each time step. On JAX ``fit()`` runs one of two jitted steps, picked in Python from the count of steps; the
sampled one returns the figures as outputs, read at the next drain. Only a step run eagerly (``run_eagerly``) sends
them through ``jax.debug.callback``. The identity is a ``jax.custom_vjp`` tied to one of the layer's weights (so the
backward pass reaches it even when its input is the data). A loss scaler's skipped steps are counted on the device
too: the outer apply adds every step to an optimizer variable, and each row keeps that count. On torch it is an
autograd hook.
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
        self._drained = self._step  # the last step id (the optimizer's, before any loss-scale mapping) drained
        self._count = 0  # "installed": the rows wait in the optimizer's ring variables
        self._lifted: list[dict] = []  # figures the jitted sampled steps returned, read at the next drain
        self._ring_vars: list[Any] = []

    def _install_activations(self) -> None:
        """Wrap ``model.train_step(state, data)`` (it reads the step from the optimizer's ``iterations`` in
        ``state``) and the ``call`` of the watched layers: on sampled steps their figures leave the jitted step as
        its outputs (:meth:`_compile_step`; through ``jax.debug.callback`` when run eagerly).

        A host callback anywhere in the jitted, differentiated step cost every step (+27% on a 20-layer MLP on
        the project's CPU, taken or not, measured), so sampled steps run a train function of their own: the step
        traced with the hooks live, compiled once, picked by :meth:`_dispatch` on steps 1 and every
        ``activation_every``. Every other step runs the step traced without them.
        """
        import jax.numpy as jnp

        model = self.model
        if "train_step" in model.__dict__:
            self._notes.append("Activations are not sampled: model.train_step is already replaced on the instance.")
            return
        if model.jit_compile and not model.run_eagerly and not hasattr(model, "_make_function"):
            self._notes.append("Activations are not sampled: this Keras version's JAX trainer has no "
                               "_make_function to build the sampled train function from.")
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
            """``(True, step)`` when this step is sampled (traced with the hooks live), else ``None``."""
            step = jnp.asarray(state[2][slot], jnp.int32) + 1 + adapter._offset
            chosen = getattr(adapter._local, "sampling", None)  # set by _dispatch; None when run eagerly
            if chosen is None:
                chosen = bool(jnp.logical_or(step == 1, step % every == 0))
            return (True, step) if chosen else None

        begin_g = self.guard(begin, "Keras (JAX) train_step")

        targets = len(self._act_targets)
        send_all = self.guard(self._send_activations, "Keras (JAX) activations")

        def train_step(state, data):
            local = adapter._local
            local.trace = begin_g(state) if adapter.active else None
            local.outputs, local.written, local.targets = {}, False, targets
            try:
                return original_step(state, data)
            finally:
                local.trace, local.outputs = None, {}

        original_loss = model.compute_loss

        def compute_loss(*args, **kwargs):
            # After the forward pass, still inside the traced function fit() differentiates: the layer outputs
            # kept so far can be read here (after it, they would be escaped tracers).
            local = adapter._local
            if getattr(local, "trace", None) is not None and local.outputs and not local.written:
                send_all(*local.trace)
            return original_loss(*args, **kwargs)

        compute_loss.__gradwatch__ = True  # type: ignore[attr-defined]
        self._acts: dict[int, dict[int, np.ndarray]] = {}
        self._fired: dict[int, dict[int, np.ndarray]] = {}
        self._times: dict[int, dict[tuple[int, str], np.ndarray]] = {}
        self._alive: dict[int, list[np.ndarray]] = {}
        self._wrap_step_and_layers(train_step, self._wrap_call)
        if "compute_loss" not in model.__dict__:
            model.__dict__["compute_loss"] = compute_loss
        self._sampled_fit = model.jit_compile and not model.run_eagerly

    def _compile_step(self, step: Any) -> Any:
        """The step jitted as Keras jits it, returning ``(logs, state, figures)``: the sampled step's activation
        and time-probe figures leave it as outputs (``{key: arrays}``, read at the next drain), not through host
        callbacks. A host callback in the step cost the 20-layer MLP's sampled steps about 5 ms each (14.4
        against 9.8 ms, the flush included), even with one scalar to send (measured)."""
        import jax
        from keras.src.distribution import distribution_lib

        adapter, own = self, self.guard(self._own_figures, "Keras (JAX) activations")

        def lifted(state, data):
            local = adapter._local
            local.lift = {}
            try:
                logs, new_state = step(state, data)
                figures = own(local.lift, new_state) or {}
            finally:
                local.lift = None
            return logs, new_state, figures

        shardings = None
        if distribution_lib.distribution() is not None:
            shardings = (None, self.model._get_state_sharding_spec(), None)
        return jax.jit(lifted, donate_argnums=0, out_shardings=shardings)

    def _train_function(self, pick: Any, pair: tuple[Any, Any]) -> Any:
        adapter = self

        def step(state, data):
            logs, state, figures = pick()(state, data)
            if figures and len(adapter._lifted) < _RING:
                adapter._lifted.append(figures)  # device arrays; no wait here
            return logs, state

        return self.model._make_function(step)

    def _own_figures(self, figures: dict, state: Any) -> dict:
        """The lifted figures that belong to the jitted step's own trace. A watched layer called inside a
        ``lax.scan`` or ``cond`` body would lift values of that inner trace, which cannot leave the step: those are
        dropped, with a note, and the rest of the step is untouched."""
        import jax

        leaves = jax.tree_util.tree_leaves(state)
        top = getattr(leaves[0], "_trace", None) if leaves else None
        own = {k: v for k, v in figures.items()
               if top is not None and all(getattr(a, "_trace", None) is top for a in jax.tree_util.tree_leaves(v))}
        if len(own) < len(figures) and not getattr(self, "_lift_noted", False):
            self._lift_noted = True
            self._notes.append("Some activations are not sampled: their layers run inside a traced loop or branch."
                               if top is not None else "Activations are not sampled: this JAX version's tracers "
                               "do not say which trace they belong to.")
        return own

    def _take_lifted(self) -> None:
        """The figures the sampled steps returned since the last drain, into the activation tables (one transfer
        per array, at the flush only)."""
        lifted, self._lifted = self._lifted, []
        for figures in lifted:
            for key, values in figures.items():
                kind, _, rest = key.partition(":")
                if kind == "acts":
                    step, stats, fired = values
                    self._on_acts(step, [int(li) for li in rest.split(",")], stats, fired)
                else:
                    li, side = rest.split(":")
                    self._on_time(values[0], int(li), side, values[1])

    def _send_activations(self, sample, step) -> None:
        """In the sampled step, once the watched layers have run: every kept output's figures, as outputs of the
        jitted sampled step, or to the host in one ``jax.debug.callback`` when run eagerly."""
        import jax

        local = self._local
        local.written = True
        items = list(local.outputs.values())
        layers = [target.index for target, _ in items]
        figures = [_jax_activation_stats(y, target) for target, y in items]
        if getattr(local, "lift", None) is not None:  # the jitted sampled step: the figures leave it as outputs
            # The kept outputs went through stop_gradient, which leaves values of the jitted step's own level
            # inside value_and_grad (checked there: _own_figures).
            local.lift["acts:" + ",".join(map(str, layers))] = (step, *zip(*figures))
            return
        on_acts = self.guard(lambda st, stats, fired: self._on_acts(st, layers, stats, fired),
                             "Keras (JAX) activations")
        jax.debug.callback(on_acts, step, tuple(f[0] for f in figures), tuple(f[1] for f in figures))

    def _wrap_call(self, target: _ActTarget):
        import jax
        import jax.numpy as jnp

        original = target.layer.call
        adapter = self
        where = f"Keras (JAX) activations of {target.layer.name}"
        li = target.index
        on_time = self.guard(self._on_time, where)
        send_all = self.guard(self._send_activations, "Keras (JAX) activations")

        def probe(x, sample, step, side):
            anchor = jnp.ravel(target.anchor.value)[:1].astype(x.dtype)

            @jax.custom_vjp
            def ident(x, a):
                return x

            def fwd(x, a):
                return x, a

            def bwd(a, g):  # traced only into the sampled step
                per_t = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=(0, 2)))
                per_t = per_t[::-1] if target.backwards else per_t
                lift = getattr(adapter._local, "lift", None)
                if lift is not None:  # the jitted sampled step: an output (the backward pass runs at its level)
                    lift[f"time:{li}:{side}"] = (step, per_t)
                else:
                    jax.debug.callback(on_time, step, li, side, per_t)
                return g, jnp.zeros_like(a)

            ident.defvjp(fwd, bwd)
            # The anchor (a weight of the layer) puts the input on the path of the gradient fit() computes, even
            # when it is the model's input; its gradient through the identity is zero.
            return ident(x, anchor)

        probe_g = self.guard(probe, where)

        def call(*args, **kwargs):
            local = adapter._local
            trace = getattr(local, "trace", None)
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
            if hasattr(y, "dtype") and jnp.issubdtype(y.dtype, jnp.floating) and li not in local.outputs:
                local.outputs[li] = (target, jax.lax.stop_gradient(y))
                if len(local.outputs) == local.targets and not local.written:
                    send_all(sample, step)  # the last watched layer of the forward pass
            return out

        call.__gradwatch__ = True  # type: ignore[attr-defined]
        return call

    def _on_acts(self, step: Any, layers: list[int], stats: Any, fired: Any) -> None:
        step = int(step)
        if step > self._step and len(self._acts) < _RING:
            for li, st, fi in zip(layers, stats, fired):
                self._acts.setdefault(step, {})[li] = np.asarray(st, dtype=np.float64)
                self._fired.setdefault(step, {})[li] = np.asarray(fi, dtype=bool)

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

    def _wrap_apply(self, inner: Any, outer: Any) -> None:
        import jax
        import jax.numpy as jnp

        self._index = {id(v): i for i, v in enumerate(self._vars)}
        self._inner, self._outer = inner, outer
        p, every, update_every = self._table.n_params, self.every, self.update_every
        adapter = self

        # Steps count from this watch's start, as on TensorFlow: the optimizer's counter may carry earlier fits.
        offset = self._step - int(np.asarray(inner.iterations.value))
        self._offset = offset
        # One spare row past the ring: steps that are not collected (``every`` > 1) write there.
        rows = inner.add_variable((_RING + 1, p, _P), initializer="zeros", dtype="float32", name="gradwatch_rows")
        steps = inner.add_variable((_RING + 1,), initializer="zeros", dtype="int32", name="gradwatch_steps")
        count = inner.add_variable((), initializer="zeros", dtype="int32", name="gradwatch_count")
        self._ring_vars = [rows, steps, count]
        # With a loss scaler the inner apply runs on finite steps only, numbered by the inner counter: the outer
        # apply counts every step, and each row keeps that count, so it gets its true step and the steps between
        # rows are known skipped. On the device: a host callback there cost a mixed_float16 MLP ~8 ms a 12 ms step.
        seen = outer_at = None
        if outer is not None:
            seen = inner.add_variable((), initializer="zeros", dtype="int32", name="gradwatch_seen")
            outer_at = inner.add_variable((_RING + 1,), initializer="zeros", dtype="int32", name="gradwatch_seen_at")
            self._ring_vars += [seen, outer_at]
        self._read_applied = 0
        self._guard_checkpoints(outer if outer is not None else inner, inner)

        def measure(grads, trainable_variables):
            variables = self._variables(trainable_variables)
            pos = [self._index.get(id(v)) for v in variables]
            before = [v.value for v in variables]
            step = jnp.asarray(inner.iterations.value, jnp.int32) + 1 + offset
            return grads, variables, step, pos, before

        def record(grads, variables, step, pos, before):
            f32 = jnp.float32
            have = [(jnp.ravel(g).astype(f32), v, b, i) for g, v, b, i in zip(grads, variables, before, pos)
                    if i is not None and g is not None]
            n = count.value
            collected = jnp.equal((step - 1) % every, 0)
            # Max |g|, the non-finite count and the update ratio every `update_every` collected steps (as on
            # TensorFlow and PyTorch); an inf/NaN gradient already shows in its L2 norm on every step.
            measured = collected & jnp.equal(n % update_every, 0)

            def detail():
                def one(g, v, b):
                    b32 = jnp.ravel(b).astype(f32)
                    return jnp.stack([jnp.max(jnp.abs(g)), jnp.sum(~jnp.isfinite(g)).astype(f32),
                                      jnp.linalg.norm(b32), jnp.linalg.norm(jnp.ravel(v.value).astype(f32) - b32)])

                return jnp.stack([one(g, v, b) for g, v, b, _ in have])

            k = len(have)
            cols = jnp.full((p, _P), jnp.nan, f32)
            if k:
                l2 = jnp.sqrt(jnp.stack([jnp.vdot(g, g) for g, _, _, _ in have]))
                l2 = jnp.where(jnp.isnan(l2), jnp.inf, l2)  # there and not finite (NaN marks "no gradient")
                # A step with a non-finite gradient is counted at once, whatever the schedule.
                counted = measured | (collected & ~jnp.all(jnp.isfinite(l2)))
                more = jax.lax.cond(counted, detail, lambda: jnp.full((k, _P - 1), jnp.nan, f32))
                cols = cols.at[jnp.asarray([i for _, _, _, i in have])].set(jnp.concatenate([l2[:, None], more], 1))
            slot = jnp.where(collected, n % _RING, _RING)
            rows.assign(rows.value.at[slot].set(cols))
            steps.assign(steps.value.at[slot].set(step))
            if outer_at is not None:
                outer_at.assign(outer_at.value.at[slot].set(seen.value))
            count.assign(n + collected.astype(jnp.int32))

        self._wrap_inner_apply(inner, measure, record, "Keras (JAX) optimizer.apply")
        self._installed_on = inner
        if outer is not None:
            outer_original = type(outer).stateless_apply
            at = next(k for k, v in enumerate(outer.variables) if v is seen)  # the inner's are the outer's too

            def outer_stateless_apply(optimizer_variables, grads, trainable_variables):
                if adapter.active:  # this step counted, before the inner apply reads the count
                    optimizer_variables = list(optimizer_variables)
                    optimizer_variables[at] = optimizer_variables[at] + 1
                return outer_original(outer, optimizer_variables, grads, trainable_variables)

            outer_stateless_apply.__gradwatch__ = True  # type: ignore[attr-defined]
            outer.stateless_apply = outer_stateless_apply
            self._wrapped.append(outer)

    def _guard_checkpoints(self, *optimizers: Any) -> None:
        """Keep the ring out of checkpoints: the optimizers' ``save_own_variables``/``load_own_variables`` (as
        ``model.save``, ``save_weights`` and ``ModelCheckpoint`` call them) see their own variables only, so a
        checkpoint saved while gradwatch is attached loads into an optimizer without it, and one saved without
        gradwatch loads while it is attached."""
        ours = {id(v) for v in self._ring_vars}
        inner = self._inner
        for opt in dict.fromkeys(optimizers):
            for name in ("save_own_variables", "load_own_variables"):
                original = getattr(type(opt), name)

                def without_ring(store, original=original, opt=opt):
                    kept = inner._variables[:]
                    inner._variables[:] = [v for v in kept if id(v) not in ours]
                    try:
                        return original(opt, store)
                    finally:
                        inner._variables[:] = kept

                without_ring.__gradwatch__ = True  # type: ignore[attr-defined]
                setattr(opt, name, without_ring)
            self._wrapped.append(opt)

    def _ring_values(self) -> list[np.ndarray]:
        """The ring variables' current values: from the trainer's state while ``fit()`` holds it (the variables
        themselves are purged then), else the variables'. One transfer per variable."""
        model = self.model
        state = getattr(model, "_jax_state", None)
        if state and not getattr(model, "_jax_state_synced", True) and state.get("optimizer_variables"):
            where = {id(v): k for k, v in enumerate(model.optimizer.variables)}
            values = state["optimizer_variables"]
            return [np.asarray(values[where[id(v)]]) for v in self._ring_vars]
        return [np.asarray(v.value) for v in self._ring_vars]

    def uninstall(self, keep: tuple[str, ...] = ()) -> None:
        # While fit() holds the trainer's state (an internal error detaches gradwatch mid-epoch), that state and
        # the next traced step count the ring among the optimizer's variables: it stays, with its checkpoint guard,
        # until fit() ends and syncs its state (on_train_end detaches again).
        model = self.model
        held = getattr(model, "_jax_state_synced", True) is False  # set from the state's gathering to its sync
        guard = ("save_own_variables", "load_own_variables")
        guarded = [o for o in self._wrapped if any(a in o.__dict__ for a in guard)]
        super().uninstall(keep=keep + guard if held and self._ring_vars else keep)
        if not self._ring_vars:
            return
        if held:
            self._wrapped.extend(guarded)
            return
        for v in self._ring_vars:
            self._inner._untrack_variable(v)
        self._ring_vars = []

    def _read_rows(self) -> tuple[np.ndarray, np.ndarray, int]:
        self._take_lifted()  # before the drain moves self._step past their steps
        values, step_ids, count, *scaled = self._ring_values()
        count = int(count)
        new = count - self._read_applied
        if new > _RING:
            self._notes.append(f"{new - _RING} steps were not read before the ring wrapped; use a smaller "
                               "flush_every.")
            self._read_applied, new = count - _RING, _RING
        slots = [(self._read_applied + k) % _RING for k in range(new)]
        self._read_applied = count
        fresh = [j for j in slots if int(step_ids[j]) > self._drained]
        self._drained = max((int(step_ids[j]) for j in fresh), default=self._drained)
        total = max(self._drained, self._step)
        true = step_ids
        if scaled:  # a loss scaler: inner step ids -> true steps; the steps in between were skipped
            seen, seen_at = scaled
            true, total = seen_at + self._step_at_install, int(seen) + self._step_at_install
        rows = {int(true[j]): values[j] for j in fresh}
        if not rows:
            return np.zeros((0, self._table.n_params, _P)), np.zeros(0, np.int64), max(total, self._step)
        order = np.asarray(sorted(rows), dtype=np.int64)
        return np.stack([rows[s] for s in order]).astype(np.float64), order, max(total, int(order[-1]))


class KerasTorchAdapter(KerasAdapter):
    """Keras 3 on PyTorch (see the module docs)."""

    backend = "torch"

    def _make_rings(self) -> None:
        self._row_steps: list[int] = []  # the step of each row in the device ring, until a drain
        self._ring = None  # the PyTorch adapter's row ring, made on the first step (on the weights' device)
        self._layouts: dict[tuple[int, ...], Any] = {}
        self._snapshot: dict[int, Any] = {}  # parameter -> its buffer for the weight snapshot
        self._total_py = self._step
        self._count = 0
        self._act_rows: list[tuple[int, dict[int, Any], dict[int, Any]]] = []
        self._sample: tuple[dict, dict] | None = None
        self._alive: dict[int, list] = {}

    def _wrap_apply(self, inner: Any, outer: Any) -> None:
        import torch

        from gradwatch.adapters._torch_packed import Layout, host_grad_columns
        from gradwatch.adapters.torch import _foreach_max, _RowRing

        self._index = {id(v): i for i, v in enumerate(self._vars)}
        self._inner, self._outer = inner, outer
        p, adapter = self._table.n_params, self
        f32 = torch.float32

        def layout(have: list, tensors: list) -> tuple[Any, Any, Any]:
            """The packed layout of this pattern of gradients, and where its columns go in a row (a tensor on the
            device and a NumPy index; made once)."""
            key = tuple(i for _, _, i in have)
            made = adapter._layouts.get(key)
            if made is None:
                device = tensors[0].device
                where = None if list(key) == list(range(p)) else torch.tensor(key, device=device)
                made = Layout(tensors, device, grouped=len(adapter._layouts) < 16), where, \
                    slice(None) if where is None else np.asarray(key)
                if len(adapter._layouts) < 16:
                    adapter._layouts[key] = made
            return made

        @torch.no_grad()
        def measure(grads, trainable_variables):
            """Before the update: the L2 norms (every collected step), max |g| and the non-finite count (every
            `update_every` collected steps, and at once when a norm is not finite) and, on those steps, a copy of
            the weights into reused buffers; the PyTorch adapter's packed CPU kernels."""
            variables = self._variables(trainable_variables)
            step = adapter._total_py + (0 if outer is not None else 1)
            if (step - 1) % adapter.every:
                return None
            pos = [adapter._index.get(id(v)) for v in variables]
            have = [(g, v, i) for g, v, i in zip(grads, variables, pos) if i is not None and g is not None]
            if not have:
                return step, have, None, None, None, None
            gs = [g for g, _, _ in have]
            lay, where, where_np = layout(have, gs)
            packed = lay.pack(gs, "grad")
            measured = adapter._count % adapter.update_every == 0
            counts = None
            if lay.cpu:  # the PyTorch adapter's host path: NumPy views, no torch call on a handful of values
                l2, *more = host_grad_columns(packed, gs, measured)
                counts = tuple(more) or None
            else:
                l2 = packed.norms()
                if measured:
                    absg = torch._foreach_abs(gs)
                    mx = torch.stack(_foreach_max(absg)).to(f32)
                    torch._foreach_mul_(absg, 0.0)
                    counts = mx, torch.stack(torch._foreach_norm(absg, 0, dtype=f32))
                l2 = l2.nan_to_num(nan=math.inf, posinf=math.inf)  # there and not finite
            before = None
            if measured:
                weights = [v.value.detach() for _, v, _ in have]
                store = adapter._scratch(lay, weights, [i for _, _, i in have])
                before = lay.snapshot(weights, store)
            return step, have, (lay, where, where_np), l2, counts, before

        @torch.no_grad()
        def record(step, have, plan, l2, counts, before):
            if adapter._ring is None:
                device = l2.device if isinstance(l2, torch.Tensor) else torch.device("cpu")
                adapter._ring = _RowRing(p, device, 32)  # it doubles if a drain comes later
            k = len(adapter._row_steps)
            if l2 is not None:
                lay, where, where_np = plan
                cols = [(0, l2)]
                if counts is not None:
                    cols += [(1, counts[0]), (2, counts[1])]
                if before is not None:
                    cols += [(3, before.norms), (4, before.update_norms([v.value.detach() for _, v, _ in have]))]
                if lay.cpu and adapter._ring.device.type == "cpu":
                    slot = adapter._ring.host_slot(k)
                    for c, values in cols:
                        slot[c, where_np] = values.numpy() if isinstance(values, torch.Tensor) else values
                else:
                    slot = adapter._ring.slot(k)
                    for c, values in cols:
                        values = torch.as_tensor(values, device=slot.device)
                        if where is None:
                            slot[c].copy_(values)
                        else:
                            slot[c].index_copy_(0, where, values.to(slot.dtype))
            else:
                adapter._ring.slot(k)  # the ring makes room for the row (NaN: no gradient this step)
            adapter._row_steps.append(step)
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

    def _scratch(self, layout: Any, weights: list, params: list[int]) -> list:
        """Reused buffers, one per parameter, for the large weights of a snapshot (the layout packs the small)."""
        import torch

        bufs = self._snapshot
        out = []
        for k in layout.solo:
            t = weights[k]
            b = bufs.get(params[k])
            if b is None or b.shape != t.shape or b.dtype != t.dtype:
                b = bufs[params[k]] = torch.empty_like(t, memory_format=torch.contiguous_format)
            out.append(b)
        return out

    def _read_rows(self) -> tuple[np.ndarray, np.ndarray, int] | None:
        steps, self._row_steps = self._row_steps, []
        if not steps:
            return np.zeros((0, self._table.n_params, _P)), np.zeros(0, np.int64), self._total_py
        values, _, _ = self._ring.take(len(steps))  # one transfer
        return values, np.asarray(steps, dtype=np.int64), self._total_py

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
