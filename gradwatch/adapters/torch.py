"""PyTorch adapter: hooks on any ``nn.Module`` (and its optimizer and loss scaler), stats kept on the device.

Where a step comes from:

- with an optimizer: ``Optimizer.register_step_pre_hook`` reads the gradients the optimizer is about to apply
  (after gradient accumulation and any clipping), ``register_step_post_hook`` measures the update it applied.
  Wrappers holding the real optimizer as ``.optimizer`` (accelerate, Lightning) are unwrapped. For
  ``optimizer.step(closure)`` the backward runs inside the step, so the gradients are read in the post-hook;
  a training-framework callback may hand them in earlier with ``collect_gradients()``;
- with a ``torch.amp.GradScaler``: the scaler's ``update()`` (wrapped on the instance while attached, restored
  on detach) ends each iteration. By then ``scaler.step`` has unscaled the gradients, so they are judged
  unscaled, and the scaler's own found-inf flags mark the steps it skipped;
- with neither: a hook on the model's output queues a callback at the end of each backward pass.

The hot path does no per-parameter kernel launches and no host-device sync: ``torch._foreach_norm`` over the
list of gradients, one ``stack`` per step, stats kept on the model's device and copied to the host once per
flush.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import unserializable_hook

from gradwatch.adapters._torch_packed import Layout, Packed, Snapshot, host_grad_columns, sum_of_squares
from gradwatch.adapters._torch_sharded import ShardPlan, local, squared_norms
from gradwatch.adapters._torch_structure import ACTIVATION_MODULES, classify, read_structure
from gradwatch.adapters.base import Adapter, Sink
from gradwatch.core.stats import (
    DEAD_UNIT_SAMPLES,
    SATURATION_MARGIN,
    STAT_NAMES,
    ActivationRows,
    ParamTable,
    StepBatch,
    time_decades,
)
from gradwatch.core.structure import UNBOUNDED, Structure, adaptive_optimizer
from gradwatch.errors import AttachError

if TYPE_CHECKING:
    from gradwatch.options import WatchOptions

__all__ = ["TorchAdapter", "unwrap_optimizer"]

# The input where sigmoid is within SATURATION_MARGIN of 0 or 1, and where tanh is within it of -1 or 1:
# saturation is read from the layer's output before the activation.
_SIGMOID_SAT = math.log((1 - SATURATION_MARGIN) / SATURATION_MARGIN)
_TANH_SAT = math.atanh(1 - SATURATION_MARGIN)
#: CPU activations under this many values are measured in NumPy (:meth:`TorchAdapter._act_figures_host`).
_HOST_NUMPY_MAX = 1 << 13
_NUMPY_FLOATS = (torch.float32, torch.float64)

# Layouts kept (one per pattern of missing gradients, and per set of snapshotted weights); past that, tensors are
# measured one by one, with no packing buffers.
_LAYOUTS = 16

_COMPILED_NOTE = ("torch.compile'd model: layer order is registration order and activations are not sampled "
                  "(hooks inside a compiled graph would force graph breaks and recompiles); gradients and updates "
                  "are measured as in eager mode.")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` that really steps: wrappers that hold it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``) are peeled off. ``TypeError`` naming what was
    received when there is none."""
    if optimizer is None:
        return None
    seen = [type(optimizer).__name__]
    inner = optimizer
    for _ in range(8):
        if isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "_optimizer_step_pre_hooks"):
            return inner
        nxt = getattr(inner, "optimizer", None)
        if nxt is None or nxt is inner:
            break
        inner = nxt
        seen.append(type(inner).__name__)
    chain = " -> ".join(seen)
    raise TypeError(
        f"optimizer must be a torch.optim.Optimizer (the one that trains this model), a wrapper holding one as "
        f".optimizer, or None; received {chain}, which holds no torch.optim.Optimizer with step hooks. Pass the "
        "optimizer built from this model's parameters, e.g. gradwatch.attach(model, torch.optim.AdamW(...)).")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose names the user knows: ``torch.compile`` wraps it as ``_orig_mod``, DDP and DataParallel
    as ``module``."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and isinstance(model, wrappers):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


class TorchAdapter(Adapter):
    """Watches one ``nn.Module``.

    Args:
        sink: The watcher.
        model: The model, possibly ``torch.compile``d.
        optimizer: The optimizer that trains it, or ``None``.
        scaler: A ``torch.amp.GradScaler``, or ``None``.
        every: Collect gradient statistics every N steps.
        update_every: Measure the update ratio every N collected steps (needs an optimizer; costs one copy of
            the parameters on those steps).
        activation_every: Sample activation statistics every N steps; ``0`` turns sampling off.
        flush_every: Steps between drains: the capacity the row ring starts with (it grows if drains are later).
    """

    framework = "torch"
    module = "torch"
    extra_options = ("scaler",)

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return isinstance(model, nn.Module)

    @classmethod
    def create(cls, sink: Sink, model: Any, optimizer: Any, options: WatchOptions, **extra: Any) -> TorchAdapter:
        return cls(sink, model, optimizer, scaler=extra.get("scaler"), every=options.every,
                   update_every=options.update_every, activation_every=options.activation_every,
                   flush_every=options.flush_every)

    def __init__(self, sink: Sink, model: nn.Module, optimizer: Any = None, *, scaler: Any = None,
                 every: int = 1, update_every: int = 10, activation_every: int = 25, flush_every: int = 25) -> None:
        super().__init__(sink)
        if not isinstance(model, nn.Module):
            raise TypeError(f"TorchAdapter needs a torch.nn.Module, received {type(model).__name__}")
        optimizer = unwrap_optimizer(optimizer)
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, received {type(scaler).__name__}")
        self.model = model
        self.root = _unwrap(model)
        self.compiled = _compiled(model)
        self._model_ref = weakref.ref(model)
        self.optimizer = optimizer
        self.scaler = scaler
        self.every = every
        self.update_every = update_every
        self.activation_every = activation_every
        self.flush_every = flush_every

        named = list(self.root.named_parameters(remove_duplicate=False))
        if not named:
            raise AttachError(f"{type(self.root).__name__} has no parameters: there are no gradients to watch.")
        if optimizer is not None:
            model_ids = {id(p) for _, p in named}
            opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not model_ids & opt_ids:
                raise ValueError(
                    f"The optimizer ({type(optimizer).__name__}, {len(opt_ids)} parameters) holds none of the "
                    f"{len(model_ids)} parameters of {type(self.root).__name__}. Pass the optimizer built from "
                    "this model's parameters, e.g. torch.optim.SGD(model.parameters(), lr=0.1).")

        self._handles: list[Any] = []
        self._order_handles: list[Any] = []
        self._restore: list[tuple[Any, str]] = []
        self._order: list[str] = []
        self._order_done = False
        self._table: ParamTable | None = None
        self._structure: Structure | None = None
        self._params: list[nn.Parameter] = []
        self._shard: ShardPlan | None = None
        self._step = 0
        self._collected = 0
        self._ring: _RowRing | None = None
        self._row_steps: list[int] = []
        self._scratch: dict[int, torch.Tensor] = {}
        self._empty: frozenset[int] = frozenset()
        self._zero1: torch.Tensor | None = None
        self._layouts: dict[bytes, Layout] = {}
        self._loss_now: torch.Tensor | None = None
        self._has_row = False  # this step's gradient columns were written into the ring
        self._dirty = False  # this step's slot of the ring holds something
        self._given = False  # this step's gradients were handed in by collect_gradients()
        self._closure_step = False  # this step runs optimizer.step(closure): gradients exist only after it
        self._prev: Snapshot | list[torch.Tensor] | None = None  # the weight snapshot (a list when sharded)
        self._prev_idx: list[int] | None = None
        self._bwd_queued = False
        self._act_rows: list[tuple[int, dict[int, torch.Tensor | np.ndarray], dict[int, torch.Tensor]]] = []
        self._act_handles: list[Any] = []
        self._act_current: tuple[dict, dict] | None = None
        self._act_plan: list[tuple[nn.Module, Any, Any]] | None = None
        self._notes: list[str] = []
        self._device: torch.device | None = None
        self._index_cache: dict[bytes, torch.Tensor] = {}
        self._alive: dict[int, deque[torch.Tensor]] = {}  # layer -> which units fired, last sampled batches
        self._overflow_now: dict[int, torch.Tensor] = {}  # this step: layer -> its unbounded activation overflowed
        self._overflow_rows: list[tuple[int, list[int], torch.Tensor]] = []
        self._install()

    @property
    def model_type(self) -> str:
        return type(self.root).__name__

    @classmethod
    def process_rank(cls) -> tuple[int, int]:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return super().process_rank()

    # -- install / detach ----------------------------------------------------------------------------------

    def _hook(self, fn, where: str):
        return unserializable_hook(self.guard(fn, where))

    def _module_hook(self, fn, where: str):
        """A module (forward) hook that does nothing inside a ``torch.compile`` trace: no graph break, no guard on
        gradwatch's state, no recompile. Compiled models are measured from the optimizer and backward hooks."""
        guarded = self.guard(fn, where)

        def hook(*args):
            if torch.compiler.is_compiling():
                return None
            return guarded(*args)

        return unserializable_hook(hook)

    def _install(self) -> None:
        if not self.compiled:
            self._record_order()
        else:
            self._notes.append(_COMPILED_NOTE)
        if self.scaler is not None:
            scaler = self.scaler
            original = type(scaler).update
            adapter = self

            end_step = self.guard(self._end_step, "scaler_update")

            def update(new_scale=None):
                found = None
                if adapter.active:
                    try:
                        found = adapter._found_inf()
                    except Exception as exc:  # noqa: BLE001 - fail-open
                        adapter.sink.on_error(exc, "scaler_update")
                original(scaler, new_scale)
                end_step(found)

            update.__gradwatch__ = True  # type: ignore[attr-defined]
            scaler.update = update
            self._restore.append((scaler, "update"))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._hook(self._pre_step, "step_pre")))
            self._handles.append(self.optimizer.register_step_post_hook(self._hook(self._post_step, "step_post")))
        if self.optimizer is None and self.scaler is None:
            self._handles.append(self.model.register_forward_hook(self._module_hook(self._arm_backward, "forward")))
        if self.activation_every and not self.compiled:
            # Recurrent layers are measured from the very first step: an explosion through time can wreck
            # the weights in one update, before any later sample would see it.
            for name, module in self.root.named_modules():
                if isinstance(module, nn.RNNBase):
                    self._act_handles.append(module.register_forward_pre_hook(
                        self._module_hook(self._rnn_pre(name, module), "rnn_time")))
            if self._act_handles:
                self._act_current = ({}, {})

    def detach(self) -> None:
        self.active = False
        for h in self._handles + self._act_handles + self._order_handles:
            h.remove()
        self._handles.clear()
        self._act_handles.clear()
        for obj, name in self._restore:
            if getattr(obj.__dict__.get(name), "__gradwatch__", False):
                del obj.__dict__[name]
        self._restore.clear()
        self._prev = None
        self._scratch.clear()
        self._layouts.clear()
        self._act_plan = None

    # -- layer order and table -----------------------------------------------------------------------------

    def _record_order(self) -> None:
        """Record the order modules run in during the first forward. The recording hooks are removed when the
        parameter table is built (in an optimizer or backward hook, outside any forward), never from inside a
        forward: a hook that removes hooks would break a ``torch.compile`` graph."""
        seen: set[str] = set()

        def make(name: str):
            def pre(module, args):
                if not self._order_done and name not in seen:
                    seen.add(name)
                    self._order.append(name)
            return pre

        def done(module, args, output):
            self._order_done = True

        handles = [module.register_forward_pre_hook(self._module_hook(make(name), "order"))
                   for name, module in self.root.named_modules()
                   if name and (next(module.parameters(recurse=False), None) is not None or isinstance(
                       module, ACTIVATION_MODULES) or not any(True for _ in module.children()))]
        handles.append(self.root.register_forward_hook(self._module_hook(done, "order_done")))
        self._order_handles = handles

    def _stop_order_recording(self) -> None:
        if not self._order and not self.compiled:
            # The hooks never ran eagerly although gradients exist: the forward ran inside a torch.compile graph
            # (compiled after attach). Its guards count each module's hooks, so adding or removing one now would
            # recompile it: the (no-op) recording hooks stay until detach, and no other module hook is added.
            self.compiled = True
            self._notes.append(_COMPILED_NOTE)
            return
        for h in self._order_handles:
            h.remove()
        self._order_handles = []

    def _build_table(self) -> None:
        self._stop_order_recording()
        root = self.root
        owners: dict[int, str] = {}
        layer_params: dict[str, list[tuple[str, nn.Parameter]]] = {}
        modules = dict(root.named_modules())
        for mname, module in modules.items():
            for pname, p in module.named_parameters(recurse=False):
                if isinstance(p, nn.parameter.UninitializedParameter):
                    continue
                if id(p) in owners:
                    continue  # tied: counted once, under the first module that owns it
                owners[id(p)] = mname
                layer_params.setdefault(mname, []).append((f"{mname}.{pname}" if mname else pname, p))
        executed = [n for n in self._order if n in layer_params]
        rest = [n for n in layer_params if n not in set(executed)]
        order = executed + rest
        params = [p for mname in order for _, p in layer_params[mname]]
        shapes = self._plan_shards(params)
        self._table = ParamTable.build([
            (mname or "(root)", type(modules[mname]).__name__, classify(modules[mname]),
             [(qual, qual.rsplit(".", 1)[-1], shapes.get(id(p), tuple(p.shape)), p.requires_grad)
              for qual, p in layer_params[mname]])
            for mname in order])
        players = self._table.param_layer
        pnames = self._table.param_names
        self._params = params
        self._modules_by_layer = [modules[m] for m in order]
        self._device = params[0].device
        # Rows of one flush period, the first _RING_ROWS made now: a flush_every of a million must not ask for
        # a million rows up front (the ring doubles when a period needs more).
        self._ring = _RowRing(len(params), self._device, min(self.flush_every, _RING_ROWS))
        self._empty = frozenset(i for i, p in enumerate(params) if local(p).numel() == 0)
        self._zero1 = torch.zeros(1, device=self._device)
        self._sparse = {i for i, p in enumerate(params) if _sparse_grad_module(modules[order[players[i]]])}
        if self._sparse:
            self._notes.append("Sparse-gradient embeddings are not measured: "
                               + ", ".join(pnames[i] for i in sorted(self._sparse)) + ".")
        self._feeders: dict[str, str] = {}
        try:
            self._structure, self._feeders = read_structure(self.root, order, self._order)
            if self.optimizer is not None:
                name = type(self.optimizer).__name__
                self._structure = dataclasses.replace(self._structure, optimizer=name,
                                                      adaptive_optimizer=adaptive_optimizer(name))
        except Exception as exc:  # noqa: BLE001 - structure is advisory; gradients are still judged
            self._structure = None
            self._notes.append(f"Model structure could not be read ({type(exc).__name__}: {exc}).")
        if self._structure is not None:
            self._notes.extend(self._structure.notes)
            if not self.compiled:
                self._watch_overflow()

    def _plan_shards(self, params: list[nn.Parameter]) -> dict[int, tuple[int, ...]]:
        """How sharded gradients become global figures (FSDP2 DTensors, FSDP1 flat shards); the original shape of
        each parameter FSDP1 flattened."""
        self._shard = ShardPlan.build(params, params[0].device)
        if self._shard is not None:
            self._notes.append("Sharded (FSDP2/DTensor) parameters: figures are global, gathered over the shard "
                               "dimensions once per measured step.")
            return {}
        fsdp1 = ShardPlan.build_fsdp1(self.root, params, params[0].device)
        if fsdp1 is None:
            return {}
        self._shard, shapes = fsdp1
        flat = [p for p in params if getattr(p, "_fqns", None) is not None]  # FSDP1's FlatParameter
        if flat:
            for p in flat:
                size = getattr(p, "_unpadded_unsharded_size", None)
                if size is not None:
                    shapes[id(p)] = tuple(size)
            self._notes.append("FSDP1 without use_orig_params=True: gradwatch sees one flat parameter per FSDP "
                               "unit, so its figures are per unit, not per layer, and no structure advice is "
                               "layer-specific. Wrap with FullyShardedDataParallel(..., use_orig_params=True) for "
                               "per-layer figures.")
        else:
            self._notes.append("FSDP1 (use_orig_params=True): figures are global, summed over the shards once "
                               "per measured step.")
        return shapes

    def _watch_overflow(self) -> None:
        """Every step, for each layer feeding an unbounded activation (``torch.exp``): whether its output passed the
        point where the activation overflows. One comparison per such layer; most models have none."""
        modules = dict(self.root.named_modules())
        for li, info in enumerate(self._structure.layers):
            feeder = modules.get(self._feeders.get(info.name, info.name))
            if info.activation in UNBOUNDED and feeder is not None:
                self._handles.append(feeder.register_forward_hook(
                    self._module_hook(self._overflow_hook(li), "overflow")))

    def _overflow_hook(self, li: int):
        def hook(module, args, output):
            x = output[0] if isinstance(output, (tuple, list)) else output
            if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.is_floating_point():
                limit = math.log(torch.finfo(x.dtype).max)
                self._overflow_now[li] = (x.detach() > limit).any()
        return hook

    def _ensure_table(self) -> bool:
        if self._table is None:
            self._build_table()
        return self._table is not None

    # -- the hot path --------------------------------------------------------------------------------------

    def _due(self) -> bool:
        """Whether the step being built now is collected: steps 1, 1 + every, 1 + 2*every, ..."""
        return self._step % self.every == 0

    def _index(self, missing: list[bool]) -> torch.Tensor:
        key = bytes(missing)
        idx = self._index_cache.get(key)
        if idx is None:
            idx = torch.tensor([i for i, m in enumerate(missing) if not m], dtype=torch.long, device=self._device)
            if len(self._index_cache) < 64:
                self._index_cache[key] = idx
        return idx

    def _put(self, rows: slice, missing: list[bool] | None, vals: torch.Tensor) -> None:
        """Write ``vals`` (one column per present parameter) into this step's slot of the row ring."""
        slot = self._ring.slot(len(self._row_steps))
        self._dirty = True
        if missing is None:
            slot[rows].copy_(vals)
        else:
            slot[rows].index_copy_(1, self._index(missing), vals.to(slot.dtype))

    def _scratch_for(self, tensors: list[torch.Tensor], at: list[int] | None) -> list[torch.Tensor]:
        """One preallocated buffer per tensor (the same shape and dtype), kept across steps: the update-ratio
        snapshot and the detail passes write into it instead of allocating a copy of the model each time."""
        bufs = self._scratch
        out = []
        for k, t in enumerate(tensors):
            i = at[k] if at is not None else k
            b = bufs.get(i)
            if b is None or b.shape != t.shape or b.dtype != t.dtype:
                b = bufs[i] = torch.empty_like(t, memory_format=torch.contiguous_format)
            out.append(b)
        return out

    def _layout(self, key: bytes, tensors: list[torch.Tensor]) -> Layout:
        """How these tensors are measured (:mod:`._torch_packed`), made once per ``key``: the pattern of gradients
        present, or the set of weights snapshotted. A model whose pattern keeps changing (more than ``_LAYOUTS``)
        gets its tensors measured one by one, with no packing buffers."""
        layout = self._layouts.get(key)
        if layout is None:
            cached = len(self._layouts) < _LAYOUTS
            layout = Layout(tensors, self._device, grouped=cached)
            if cached:
                self._layouts[key] = layout
        return layout

    def _grad_stats(self, detail: bool) -> None:
        """Write this step's gradient columns into the row ring: L2 norm, max |g|, non-finite count; NaN where
        no gradient.

        The L2 norm is taken on every collected step, and an inf/NaN norm already says a gradient is non-finite.
        Max |g| and the exact count of non-finite values are taken on ``detail`` steps only (those that measure the
        update ratio), NaN otherwise.
        """
        params = self._params
        grads = [p.grad for p in params]
        stand_ins = self._shard.stand_ins if self._shard is not None else None
        if stand_ins:
            grads = [stand_ins[i] if g is None and i in stand_ins else g for i, g in enumerate(grads)]
        missing = [g is None or i in self._sparse for i, g in enumerate(grads)] if self._sparse else \
            [g is None for g in grads]
        at: list[int] | None = None
        if True in missing:
            at = [i for i, m in enumerate(missing) if not m]
            present = [grads[i] for i in at]
            if not present:
                return  # the slot stays NaN
        else:
            present, missing = grads, None
        if self._shard is not None:  # local shards; the L2 column holds sums of squares until ShardPlan.reduce
            present = [local(g) for g in present]
            l2 = squared_norms(present)
            cols = self._foreach_detail(present, at, l2) if detail else None
        else:
            packed = self._layout(bytes(missing) if missing else b"", present).pack(present, "grad")
            if packed.layout.cpu:
                self._grad_stats_host(packed, present, missing, detail)
                return
            l2 = packed.norms()
            cols = self._foreach_detail(present, at, l2) if detail else None
        l2 = l2.nan_to_num(nan=math.inf, posinf=math.inf)  # there and not finite (NaN marks "no gradient" in a row)
        if not detail:
            self._put(slice(0, 1), missing, l2.to(self._device).unsqueeze(0))
            return
        self._put(slice(0, 3), missing, torch.stack([l2, *cols]).to(self._device))

    def _grad_stats_host(self, packed: Packed, present: list[torch.Tensor], missing: list[bool] | None,
                         detail: bool) -> None:
        """:meth:`_grad_stats` on CPU: the kernels write into reused buffers and the figures go into the ring
        through NumPy views (:meth:`Packed.host_norms`). Reading a CPU value costs no sync, so a non-finite
        gradient is counted at once."""
        cols = host_grad_columns(packed, present, detail)
        slot = self._ring.host_slot(len(self._row_steps))
        self._dirty = True
        at = slice(None) if missing is None else self._index(missing).numpy()
        for c, values in enumerate(cols):
            slot[c, at] = values

    def _foreach_detail(self, present: list[torch.Tensor], at: list[int] | None,
                        l2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Max |g| and the non-finite count of each tensor with fused ``_foreach`` kernels (GPU, sharded): |g| copied
        into the preallocated scratch buffers, its max (NaN propagates), then ``|g| * 0`` (0 where finite, NaN where
        not) counted by a 0-"norm", all without a sync. On CPU the count pass runs only when ``l2`` (norms, or sums
        of squares) is not finite."""
        f32 = torch.float32
        on_cpu = self._device.type == "cpu"
        if not on_cpu and self._prev is None:  # the scratch is free (not holding a weight snapshot)
            absg = self._scratch_for(present, at)
            torch._foreach_copy_(absg, present)
            torch._foreach_abs_(absg)
        else:
            absg = torch._foreach_abs(present)
        empty = self._empty
        if empty:
            idx = at if at is not None else range(len(present))
            absg = [self._zero1 if i in empty else t for t, i in zip(absg, idx)]
        mx = torch.stack(_foreach_max(absg)).to(f32)
        if on_cpu and bool(torch.isfinite(l2).all()):
            return mx, torch.zeros_like(mx)
        torch._foreach_mul_(absg, 0.0)
        return mx, torch.stack(torch._foreach_norm(absg, 0, dtype=f32))

    def _detail_due(self) -> bool:
        return self._collected % self.update_every == 0

    def _snapshot_params(self, before_backward: bool = False) -> None:
        """Copy the weights about to be updated into preallocated buffers (packed like the gradients on CPU)."""
        params = self._params
        # Before a closure's backward no gradient exists yet: snapshot every trainable parameter, and keep those
        # that got a gradient when the update is measured.
        stand_ins = (self._shard.stand_ins or {}) if self._shard is not None else {}
        idx = [i for i, p in enumerate(params) if i not in self._sparse and (
            p.grad is not None or i in stand_ins or (before_backward and p.requires_grad))]
        self._prev_idx = idx
        if not idx:
            self._prev = None
            return
        now = [local(params[i]) for i in idx]
        with torch.no_grad():
            if self._shard is not None:
                self._prev = self._scratch_for(now, idx)
                torch._foreach_copy_(self._prev, now)
                return
            present = [False] * len(params)
            for i in idx:
                present[i] = True
            layout = self._layout(b"w" + bytes(present), now)
            store = self._scratch_for([now[k] for k in layout.solo], [idx[k] for k in layout.solo])
            self._prev = layout.snapshot(now, store)

    def _update_stats(self) -> None:
        """Write this step's weight-norm and update-norm columns from the snapshot: ``||w_old||``, then the
        snapshot becomes ``w_old - w_new`` in place."""
        if self._prev is None or not self._prev_idx:
            return
        params = self._params
        prev, idx = self._prev, self._prev_idx
        self._prev = None
        now = [local(params[i]) for i in idx]
        with torch.no_grad():
            if isinstance(prev, Snapshot):
                wn, un = prev.norms, prev.update_norms(now)
            else:  # sharded: sums of squares until ShardPlan.reduce
                wn = squared_norms(prev)
                torch._foreach_sub_(prev, now)
                un = squared_norms(prev)
        # A closure step snapshots every trainable weight before its backward: only those that got a gradient count.
        kept = [i for i in idx if params[i].grad is not None] if self._closure_step else idx
        if not kept:
            return
        missing = None
        if len(kept) < len(params):
            missing = [True] * len(params)
            for i in kept:
                missing[i] = False
        vals = torch.stack([wn, un])
        if len(kept) < len(idx):
            vals = vals[:, [k for k, i in enumerate(idx) if params[i].grad is not None]]
        self._put(slice(3, 5), missing, vals.to(self._device))

    def collect_gradients(self) -> None:
        """Read the gradients now, for the step in progress: what a training framework's "before the optimizer
        step" callback sees (Lightning's ``on_before_optimizer_step``: accumulated, unscaled, not yet clipped).
        The optimizer hooks then only measure the update and close the step."""
        if not self.active or not self._ensure_table() or not self._due():
            return
        self._grad_stats(self._detail_due())
        self._has_row = self._given = True

    def _pre_step(self, optimizer, args, kwargs) -> None:
        # optimizer.step(closure) runs the backward inside the step (Lightning, LBFGS): the gradients this pre-hook
        # could read are last step's. Snapshot the weights now and read the gradients in the post-hook.
        # The hook's args are step()'s own: (optimizer, closure?).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        self._closure_step = closure is not None
        if self._closure_step and self._table is None:
            return  # no forward has run yet: the post-hook builds the table once the closure ran one
        if not self._ensure_table() or not self._due():
            return
        if self.scaler is None and not self._closure_step and not self._given:
            self._grad_stats(self._detail_due())
            self._has_row = True
        if self._detail_due():
            self._snapshot_params(before_backward=self._closure_step)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if not self._ensure_table():
            return
        if self._prev is not None:
            self._update_stats()  # first: the snapshot lives in the scratch buffers the detail passes reuse
        if self._closure_step and self._due() and not self._given and self.scaler is None:
            self._grad_stats(self._detail_due())
            self._has_row = True
        if self.scaler is None:
            self._finish_step(None)

    def _found_inf(self) -> torch.Tensor | None:
        states = getattr(self.scaler, "_per_optimizer_states", None) or {}
        flags = [v for st in states.values() for v in st.get("found_inf_per_device", {}).values()]
        if not flags:
            return None
        return torch.stack([f.to(self._device or flags[0].device).reshape(()) for f in flags]).sum() > 0


    def _arm_backward(self, module, args, output) -> None:
        if not torch.is_grad_enabled():
            return
        for t in torch.utils._pytree.tree_leaves(output):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self._hook(self._backward_started, "backward"))
                return

    def _backward_started(self, grad) -> None:
        if not self._bwd_queued:
            self._bwd_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.guard(self._backward_done, "backward_end"))

    def _backward_done(self) -> None:
        self._bwd_queued = False
        self._end_step(None)

    def _end_step(self, skipped: torch.Tensor | None) -> None:
        """A step that ends without an optimizer hook (end of backward, or the scaler's update): read the
        gradients now, unscaled by then, and close the step; ``skipped`` is the scaler's found-inf flag."""
        if not self._ensure_table():
            return
        if self._due() and not self._given:
            self._grad_stats(self._detail_due())
            self._has_row = True
        self._finish_step(skipped)

    def _finish_step(self, skipped: torch.Tensor | None) -> None:
        self._step += 1
        step = self._step
        if self._has_row:
            self._ring.commit(len(self._row_steps), self._shard, skipped, self._loss_now)
            self._row_steps.append(step)
            self._collected += 1
        elif self._dirty:  # an update measured on a step whose gradients were not: the slot is reused
            self._ring.clear(len(self._row_steps))
        self._has_row = self._dirty = False
        self._given = False
        self._loss_now = None
        if self._overflow_now:
            layers = sorted(self._overflow_now)
            self._overflow_rows.append((step, layers, torch.stack([self._overflow_now[li] for li in layers])))
            self._overflow_now = {}
        self._end_activation_sample()
        if self.activation_every and not self.compiled and (step == 1 or step % self.activation_every == 0):
            self._begin_activation_sample()
        self.sink.on_step(step)

    # -- activation sampling -------------------------------------------------------------------------------

    def _begin_activation_sample(self) -> None:
        """Hook the next forward pass: per layer, the output feeding its activation, and RNN inputs. The hooks are
        made once (:meth:`_activation_plan`); a sample only registers them, and its end removes them."""
        if self._structure is None or self._act_handles:
            return
        self._act_current = ({}, {})
        for module, pre, hook in self._activation_plan():
            if pre is not None:
                self._act_handles.append(module.register_forward_pre_hook(pre))
            self._act_handles.append(module.register_forward_hook(hook))

    def _activation_plan(self) -> list[tuple[nn.Module, Any, Any]]:
        """Per sampled module: the module, its forward pre-hook (a recurrent layer's time probe, else ``None``) and
        its forward hook (the figures of the output feeding the layer's activation)."""
        if self._act_plan is None:
            modules = dict(self.root.named_modules())
            plan = []
            for li, info in enumerate(self._structure.layers):
                feeder = modules.get(self._feeders.get(info.name, info.name))
                if feeder is None:
                    continue
                pre = None
                if info.kind == "recurrent" and isinstance(feeder, nn.RNNBase):
                    pre = self._module_hook(self._rnn_pre(info.name, feeder), "rnn_time")
                plan.append((feeder, pre, self._module_hook(self._act_hook(li, info.activation), "activations")))
            self._act_plan = plan
        return self._act_plan

    def _act_hook(self, li: int, act: str | None):
        cut = {"sigmoid": _SIGMOID_SAT, "tanh": _TANH_SAT}.get(act or "")
        relu = act in ("relu", "relu6")

        def hook(module, args, output):
            current = self._act_current
            if current is None or li in current[0]:
                return
            x = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
                return
            # Detached: nothing below joins the graph (no no_grad context, 5 us a layer).
            current[0][li] = self._act_figures(module, x.detach(), li, cut, relu)
        return hook

    def _act_figures(self, module: nn.Module, x: torch.Tensor, li: int, cut: float | None,
                     relu: bool) -> torch.Tensor | np.ndarray:
        """``[saturation, dead, rms, non-finite count]`` of one layer's output (NaN where not measured): on CPU a
        NumPy row (:meth:`_act_figures_host`), elsewhere a tensor on the model's device (no sync)."""
        if x.device.type == "cpu":
            return self._act_figures_host(module, x, li, cut, relu)
        n = x.numel()
        sq = sum_of_squares(x)
        sat = torch.count_nonzero(x.abs() > cut) / n if cut is not None else None
        dead = self._dead_fraction(li, _alive_units(module, x)) if relu and x.dim() >= 2 else None
        nan = torch.full((), float("nan"), device=x.device)  # a fill: no host copy
        rms = (sq / n).sqrt()
        nonfinite = (~torch.isfinite(x)).sum().float()
        figures = [nan if sat is None else sat.float(), nan if dead is None else dead, rms, nonfinite]
        return torch.stack(figures).to(self._device)

    def _act_figures_host(self, module: nn.Module, x: torch.Tensor, li: int, cut: float | None,
                          relu: bool) -> np.ndarray:
        """:meth:`_act_figures` on CPU, where reading a value costs no sync: the RMS from one ``dot``, the
        non-finite values counted only when it is not finite. An output under ``_HOST_NUMPY_MAX`` values is read
        through a NumPy view: on the project's CPU a torch call on 2,048 values took 7 us and NumPy's 3.7 (a
        1,001-layer model's sampled forward spent 46 us a layer in gradwatch's hooks). Larger outputs keep torch's
        kernels, whose threads NumPy's BLAS would compete with."""
        n = x.numel()
        a = x.numpy(force=True) if n < _HOST_NUMPY_MAX and x.dtype in _NUMPY_FLOATS else None
        if a is not None:
            flat = a.reshape(-1)
            with np.errstate(all="ignore"):  # an overflow is reported as a figure, not a NumPy warning
                total = float(np.dot(flat, flat))
                sat = np.count_nonzero(np.abs(flat) > cut) / n if cut is not None else math.nan
        else:
            total = float(sum_of_squares(x))
            sat = float(torch.count_nonzero(x.abs() > cut)) / n if cut is not None else math.nan
        dead = math.nan
        if relu and x.dim() >= 2:
            alive = _alive_units(module, a if a is not None else x)
            fraction = self._dead_fraction(li, alive if a is not None else alive.numpy())
            dead = math.nan if fraction is None else float(fraction)
        nonfinite = 0.0 if math.isfinite(total) else float(torch.count_nonzero(x - x))
        return np.array([sat, dead, math.sqrt(total / n), nonfinite])

    def _dead_fraction(self, li: int, alive: torch.Tensor | np.ndarray) -> torch.Tensor | float | None:
        """The share of units that fired on no input of the last DEAD_UNIT_SAMPLES sampled batches (a tensor on
        the device, a float for NumPy on CPU; ``None`` until that many were sampled)."""
        seen = self._alive.setdefault(li, deque(maxlen=DEAD_UNIT_SAMPLES))
        if seen and (seen[-1].shape != alive.shape or type(seen[-1]) is not type(alive)):
            seen.clear()
        seen.append(alive)
        if len(seen) < DEAD_UNIT_SAMPLES:
            return None
        if isinstance(alive, np.ndarray):
            return float((~np.stack(list(seen)).any(axis=0)).mean())
        return (~torch.stack(list(seen)).any(dim=0)).float().mean()

    def _rnn_pre(self, key: str, module: nn.RNNBase):
        batch_first = bool(getattr(module, "batch_first", False))

        def pre(mod, args):
            current = self._act_current
            if current is None:
                return None
            grads = current[1]
            if key in grads or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
                return None
            if not torch.is_grad_enabled():
                return None
            x = args[0]
            if not x.requires_grad:
                # A zero that requires grad makes the input a node of the graph without changing its value,
                # so the gradient with respect to each time step's input can be read.
                x = x + torch.zeros((), device=x.device, dtype=x.dtype, requires_grad=True)

            def on_grad(g):
                with torch.no_grad():
                    per_t = g.detach().float().pow(2).sum(dim=(0, 2) if batch_first else (1, 2)).sqrt()
                    grads[key] = per_t.to(self._device or per_t.device)

            x.register_hook(self.guard(on_grad, "rnn_grad"))
            return (x, *args[1:])
        return pre

    def _end_activation_sample(self) -> None:
        if not self._act_handles or self._act_current is None:
            return
        sat, grads = self._act_current
        if not sat and not grads:
            return  # the forward of this step has not run yet (the sample was armed after it)
        for h in self._act_handles:
            h.remove()
        self._act_handles.clear()
        self._act_rows.append((self._step, dict(sat), dict(grads)))
        self._act_current = None

    # -- drain ---------------------------------------------------------------------------------------------

    def log_loss(self, loss: Any) -> None:
        """Keep this step's training loss (a 0-d tensor stays on the device; no sync)."""
        if isinstance(loss, torch.Tensor):
            value = loss.detach().float()
            value = value.reshape(()) if value.numel() == 1 else value.mean()
        else:
            value = torch.tensor(float(loss), dtype=torch.float32)
        self._loss_now = value.to(self._device) if self._device is not None else value

    def drain(self) -> tuple[StepBatch | None, ActivationRows | None]:
        batch = None
        if self._row_steps:
            n = len(self._row_steps)
            values, skipped, loss = self._ring.take(n)
            batch = StepBatch(steps=np.asarray(self._row_steps, dtype=np.int64), values=values, skipped=skipped,
                              extras={"loss": loss} if np.isfinite(loss).any() else {})
            self._row_steps.clear()
        acts = self._drain_activations()
        return batch, acts

    def _overflow_samples(self, n_layers: int) -> list[tuple[int, np.ndarray, dict]]:
        """The steps whose forward overflowed an unbounded activation, as samples holding only the non-finite
        column (one transfer for all of them); steps without an overflow give no sample."""
        if not self._overflow_rows:
            return []
        rows, self._overflow_rows = self._overflow_rows, []
        flags = torch.cat([f for _, _, f in rows]).cpu().numpy()
        out, k = [], 0
        for step, layers, _ in rows:
            hit = flags[k:k + len(layers)]
            k += len(layers)
            if hit.any():
                col = np.full(n_layers, np.nan)
                col[layers] = hit.astype(np.float64)
                out.append((step, col, {}))
        return out

    def _drain_activations(self) -> ActivationRows | None:
        if self._table is None or not (self._act_rows or self._overflow_rows):
            return None
        n_layers = self._table.n_layers
        rows = self._act_rows + self._overflow_samples(n_layers)
        rows.sort(key=lambda r: r[0])
        self._act_rows = []
        k = len(rows)
        arr = np.full((k, 4, n_layers), np.nan)
        tdec = np.full((k, n_layers), np.nan)
        for r, (_, sat, grads) in enumerate(rows):
            if isinstance(sat, np.ndarray):  # an overflow sample: only the non-finite column
                arr[r][3] = sat
                continue
            if sat:
                keys = sorted(sat)
                figures = [sat[i] for i in keys]  # NumPy rows on CPU, tensors elsewhere
                host = np.stack([f if isinstance(f, np.ndarray) else f.cpu().numpy() for f in figures]) \
                    if any(isinstance(f, np.ndarray) for f in figures) else torch.stack(figures).cpu().numpy()
                arr[r][:, keys] = host.T
            layer_index = {name: i for i, name in enumerate(self._table.layer_names)}
            for name, per_t in grads.items():
                li = layer_index.get(name or "(root)")
                if li is None:
                    continue
                tdec[r, li] = time_decades(per_t.cpu().numpy())
        steps = np.asarray([s for s, _, _ in rows], dtype=np.int64)
        return ActivationRows(steps=steps, saturation=arr[:, 0], dead=arr[:, 1], rms=arr[:, 2],
                              nonfinite=arr[:, 3], time_decades=tdec)


def _alive_units(module: nn.Module, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Per unit of a layer's output (torch or NumPy alike), whether it fired (> 0) on any input: a convolution's
    units are its channels (dim 1), a linear or recurrent layer's its last dim."""
    if x.ndim > 2 and not isinstance(module, (nn.Linear, nn.RNNBase)):
        units = x.swapaxes(0, 1).reshape(x.shape[1], -1)
    else:
        units = x.reshape(-1, x.shape[-1]).T
    return (units > 0).any(1)


def _count_nonfinite(g: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """The number of inf/NaN values of a CPU tensor whose L2 norm is ``l2``: none when the norm is finite (no sync
    on CPU), else counted."""
    if math.isfinite(float(l2)):
        return torch.zeros((), dtype=torch.float32)
    return torch.count_nonzero(g - g).float()  # g - g is NaN exactly where g is inf or NaN


def _foreach_max(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per tensor, its max (NaN if it holds one): ``torch._foreach_max`` where torch has it (2.4+); the infinity
    norm, ten times slower on CPU, where not (the tensors are non-negative here)."""
    fused = getattr(torch, "_foreach_max", None)
    return fused(tensors) if fused is not None else torch._foreach_norm(tensors, math.inf)


#: Rows a ring holds at first (``flush_every`` if fewer); it doubles as a flush period needs.
_RING_ROWS = 64


class _RowRing:
    """The rows of one flush period, preallocated on the model's device: ``(capacity, 5, P)`` statistics in
    :data:`STAT_NAMES` order (NaN until written), a skipped flag and a loss per row. Each measured step writes its
    slot in place (no per-step allocation); a drain copies the used slots to the host in one transfer and resets
    them. It doubles when a drain comes late, so memory stays bounded by the flush period."""

    def __init__(self, n_params: int, device: torch.device, capacity: int) -> None:
        self.n_params = n_params
        self.device = device
        self.values = torch.full((max(capacity, 1), len(STAT_NAMES), n_params), float("nan"), device=device)
        self.skipped = torch.zeros(self.values.shape[0], dtype=torch.bool, device=device)
        self.loss = torch.full((self.values.shape[0],), float("nan"), device=device)
        self._host = self.values.numpy() if device.type == "cpu" else None

    def _fit(self, k: int) -> None:
        """Make room for row ``k``: the ring doubles (a drain came late)."""
        while k >= self.values.shape[0]:
            extra = self.values.shape[0]
            self.values = torch.cat([self.values, torch.full_like(self.values, float("nan"))])
            self.skipped = torch.cat([self.skipped, torch.zeros(extra, dtype=torch.bool, device=self.device)])
            self.loss = torch.cat([self.loss, torch.full((extra,), float("nan"), device=self.device)])
            if self._host is not None:
                self._host = self.values.numpy()

    def slot(self, k: int) -> torch.Tensor:
        self._fit(k)
        return self.values[k]

    def host_slot(self, k: int) -> np.ndarray:
        """Row ``k`` as a writable NumPy view (a CPU ring only; no torch call, see :meth:`Packed.host_norms`)."""
        self._fit(k)
        return self._host[k]

    def commit(self, k: int, shard: ShardPlan | None, skipped: torch.Tensor | None,
               loss: torch.Tensor | None) -> None:
        self._fit(k)
        if shard is not None:
            self.values[k].copy_(shard.reduce(self.values[k]))
        if skipped is not None:
            self.skipped[k].copy_(skipped)
        if loss is not None:
            self.loss[k].copy_(loss)

    def clear(self, k: int) -> None:
        if k < self.values.shape[0]:
            self.values[k].fill_(float("nan"))

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first ``n`` rows as host arrays ``(n, P, 5)``, skipped ``(n,)``, loss ``(n,)``; then reset."""
        host = torch.cat([self.values[:n].reshape(-1), self.skipped[:n].float(), self.loss[:n]]).cpu().numpy()
        cut = n * self.n_params * len(STAT_NAMES)
        values = host[:cut].reshape(n, len(STAT_NAMES), self.n_params).transpose(0, 2, 1).astype(np.float64)
        skipped, loss = host[cut:cut + n] > 0, host[cut + n:].astype(np.float64)
        self.values[:n].fill_(float("nan"))
        self.skipped[:n].zero_()
        self.loss[:n].fill_(float("nan"))
        return values, skipped, loss


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` runs through ``torch.compile`` (an ``OptimizedModule`` anywhere in the wrapper chain, or an
    in-place ``model.compile()``)."""
    for _ in range(4):
        if getattr(model, "_compiled_call_impl", None) is not None:
            return True
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            return True
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return False
    return False


def _sparse_grad_module(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and bool(getattr(module, "sparse", False))
