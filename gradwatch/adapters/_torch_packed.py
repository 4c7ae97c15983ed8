"""Per-tensor L2 norms, max |x| and non-finite counts of many tensors at once, in as few kernels as the device
allows: the PyTorch adapter's hot path.

- **GPU** (and any non-CPU device): ``torch._foreach_*`` fused multi-tensor kernels, a handful of launches for the
  whole model, no host-device sync.
- **CPU**: there ``_foreach_*`` is a loop of one kernel per tensor, and the norm kernel itself is slow. Measured on
  the project's 2-core CPU machine (calls interleaved, median of 200):

  ==========================================  =========================  =====================
  kernel                                      20x512 MLP (42 tensors,    1001-layer MLP (2,002
                                              5.0 M elements)            tensors, 2.1 M)
  ==========================================  =========================  =====================
  ``_foreach_norm``                           0.99 ms                    5.5 ms
  ``torch.dot(g, g)`` per tensor (BLAS)       0.60 ms                    5.6 ms
  ``cat`` per shape into a buffer + row norms 1.65 ms                    2.7 ms
  max|g|: ``_foreach_max(_foreach_abs(g))``   8.6 ms                     -
  max|g|: ``torch.aminmax`` per tensor        0.77 ms                    -
  ==========================================  =========================  =====================

  So a large tensor is measured in place (``dot``, ``aminmax``: one pass each, no copy), and small tensors of the
  same shape and dtype are copied with one ``torch.cat`` into a preallocated ``(k, n)`` buffer and measured row
  by row, one kernel per shape instead of one per tensor.

A :class:`Layout` is built once per list of tensors (shapes and dtypes; the adapter caches it per pattern of
missing gradients), and its buffers are reused every step. On a GPU every figure stays a tensor on the device; on
CPU the kernels write into preallocated buffers read through NumPy views (:meth:`Packed.host_norms`).

The update ratio needs the weights before the update (:class:`Snapshot`). On CPU, a large weight's update norm is
estimated from a fixed sample of it: every ``SAMPLE_EVERY``-th 64-byte line, so that every row of a weight matrix
(each output unit) is in it, the sample's lines shifting from row to row. Copying and subtracting the whole
weight cost the 20x512 MLP 4.5 ms a measured step (20 MB copied, then read three times); the sample costs 2.5 ms,
most of it the exact weight norm (one read; cold caches, median of 100). The weight norm is exact; the update
norm is the sample's, scaled by the square root of the tensor's size over the sample's (within 1% of the exact
figure in the tests, under Adam and SGD).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["Layout", "Packed", "Snapshot", "count_nonfinite", "host_grad_columns", "sum_of_squares"]

#: Tensors under this many elements are packed (``cat``) with the others of their shape. Around 4K elements a
#: tensor's own kernel launch (~3 us) costs about what copying it costs; below, packing wins.
GROUP_MAX = 1 << 13
#: At most this many elements are packed per buffer set (the rest are measured in place): memory stays bounded.
GROUP_CAP = 1 << 22
#: CPU weights with at least this many elements (and rows of at least 8 sampled lines' length) have their update
#: norm estimated from a sample (:class:`Snapshot`); smaller ones are copied whole.
SAMPLE_MIN = 1 << 16
#: One 64-byte line in this many is sampled: 7 is odd, so on rows a power of two long the sample shifts row to row.
SAMPLE_EVERY = 7

_F32 = torch.float32


class Packed:
    """A list of tensors as a :class:`Layout` measures them: the large ones as they are (``solo``), the small ones
    copied into ``(k, n)`` row buffers, one per shape (``rows``)."""

    __slots__ = ("layout", "rows", "solo")

    def __init__(self, layout: Layout, solo: list[torch.Tensor], rows: list[torch.Tensor]) -> None:
        self.layout, self.solo, self.rows = layout, solo, rows

    def norms(self) -> torch.Tensor:
        """The L2 norm of each tensor (float32), in the layout's order."""
        lay = self.layout
        if not lay.cpu:
            return torch.stack(torch._foreach_norm(self.solo, 2, dtype=_F32)) if self.solo else lay.zeros
        return torch.from_numpy(self.host_norms()[0].copy())

    def host_norms(self, maxima: bool = False) -> tuple[np.ndarray, torch.Tensor | None]:
        """CPU only: the L2 norm of each tensor as a NumPy float32 array in the layout's order (the layout's own
        buffer, valid until its next call), and with ``maxima`` the max |x| of each (:meth:`maxima`), each large
        tensor's two passes back to back. The kernels write into preallocated buffers and the rest runs in
        NumPy: inside a training step on the 2-core CPU a torch call costs 20-80 us (measured in an optimizer
        hook of the LSTM benchmark), a NumPy call on a few hundred values about 1 us."""
        lay = self.layout
        lo, hi = [], []
        for t, out in zip(self.solo, lay.solo_out):
            _squares_into(t, out)
            if maxima:
                low, high = torch.aminmax(t) if t.numel() else (lay.zero, lay.zero)
                lo.append(low)
                hi.append(high)
        for r, out in zip(self.rows, lay.row_out):
            torch.linalg.vector_norm(r, dim=1, dtype=_F32, out=out)
        host = lay.host
        if lay.solo:
            host[lay.solo_at] = np.sqrt(lay.solo_host)
        for at, out in zip(lay.row_at, lay.row_host):
            host[at] = out
        if not maxima:
            return host, None
        largest = [_largest(torch.stack(lo), torch.stack(hi))] if self.solo else []
        largest += [_largest(*torch.aminmax(r, dim=1)) for r in self.rows]
        return host, lay.arrange(largest)

    def maxima(self) -> torch.Tensor:
        """The max |x| of each tensor (NaN where it holds a NaN; 0 for an empty one), CPU only."""
        lay = self.layout
        parts = []
        if self.solo:
            lo, hi = zip(*(torch.aminmax(t) if t.numel() else (lay.zero, lay.zero) for t in self.solo))
            parts.append(_largest(torch.stack(lo), torch.stack(hi)))
        parts += [_largest(*torch.aminmax(r, dim=1)) for r in self.rows]
        return lay.arrange(parts)


def _largest(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """max |x| from min and max (float32; NaN propagates)."""
    return torch.maximum(hi.to(_F32), lo.to(_F32).neg())


class Layout:
    """How one list of tensors (fixed shapes and dtypes) is measured on its device.

    Args:
        tensors: The tensors, as they will be passed to :meth:`pack` (their shapes and dtypes fix the layout).
        device: Their device; packing is for CPU only.
        grouped: Pack small tensors (a layout reused step after step); ``False`` measures each where it is and
            allocates nothing.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], device: torch.device, grouped: bool = True) -> None:
        self.n = len(tensors)
        self.device = device
        self.cpu = device.type == "cpu"
        self.zero = torch.zeros((), device=device)
        self.zeros = torch.zeros(0, device=device)
        shapes: dict[tuple, list[int]] = {}
        budget = GROUP_CAP
        if self.cpu and grouped:
            for i, t in enumerate(tensors):
                if 0 < t.numel() < GROUP_MAX and t.dim() >= 1 and t.numel() <= budget:
                    shapes.setdefault((tuple(t.shape), t.dtype), []).append(i)
                    budget -= t.numel()
        self.groups = [(members, shape, dtype) for (shape, dtype), members in shapes.items() if len(members) > 1]
        grouped = {i for members, _, _ in self.groups for i in members}
        self.solo = [i for i in range(self.n) if i not in grouped]
        #: Positions in ``solo`` whose update norm is estimated from a sample (CPU only).
        self.sampled = frozenset(k for k, i in enumerate(self.solo) if self.cpu and _samplable(tensors[i]))
        order = self.solo + [i for members, _, _ in self.groups for i in members]
        # Results come solo first, then each group: scattered back to the tensors' order (None: already in it).
        self._order = None if order == list(range(self.n)) else torch.tensor(order, device=device)
        self._buffers: dict[str, list[torch.Tensor]] = {}
        if self.cpu:  # Packed.host_norms: where each kernel writes, and where its figures go in the result
            solo_sq = torch.empty(len(self.solo), dtype=_F32)
            self.solo_out = [solo_sq[k] for k in range(len(self.solo))]
            self.solo_host, self.solo_at = solo_sq.numpy(), np.asarray(self.solo, dtype=np.int64)
            self.row_out = [torch.empty(len(members), dtype=_F32) for members, _, _ in self.groups]
            self.row_host = [out.numpy() for out in self.row_out]
            self.row_at = [np.asarray(members, dtype=np.int64) for members, _, _ in self.groups]
            self.host = np.empty(self.n, dtype=np.float32)

    def pack(self, tensors: Sequence[torch.Tensor], into: str) -> Packed:
        """The tensors packed into the row buffers named ``into`` (made once, reused); the large ones are measured
        where they are."""
        rows = []
        if self.groups:
            bufs = self._buffers.get(into)
            if bufs is None:
                bufs = self._buffers[into] = [torch.empty((len(m) * shape[0], *shape[1:]), dtype=dtype,
                                                          device=self.device) for m, shape, dtype in self.groups]
            for (members, _, _), buf in zip(self.groups, bufs):
                torch.cat([tensors[i] for i in members], out=buf)
                rows.append(buf.view(len(members), -1))
        return Packed(self, [tensors[i] for i in self.solo], rows)

    def snapshot(self, tensors: Sequence[torch.Tensor], store: list[torch.Tensor]) -> Snapshot:
        """The weights about to be updated, kept to measure their update (:class:`Snapshot`). ``store``: one
        buffer per solo tensor, its shape and dtype (reused from step to step)."""
        return Snapshot(self, tensors, store)

    def arrange(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-tensor results, given solo first and then group by group, in the tensors' order."""
        flat = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else self.zeros
        if self._order is None:
            return flat
        return torch.empty_like(flat).index_copy_(0, self._order, flat)


class Snapshot:
    """The weights before an update, kept to measure ``||w||`` and ``||w - w_new||`` per tensor: small tensors of one
    shape packed into row buffers, large ones copied into ``store``, or on CPU, for those the layout samples, only
    every ``SAMPLE_EVERY``-th 64-byte line of them (``||w||`` is then taken exactly, in place)."""

    __slots__ = ("layout", "norms", "_kept", "_rows", "_scale")

    def __init__(self, layout: Layout, tensors: Sequence[torch.Tensor], store: list[torch.Tensor]) -> None:
        self.layout = layout
        packed = layout.pack(tensors, "before")
        self._rows = packed.rows
        if not layout.cpu:  # fused kernels: every weight copied whole
            if packed.solo:
                torch._foreach_copy_(store, packed.solo)
            self._kept, self._scale = list(store), {}
            self.norms = Packed(layout, self._kept, []).norms()
            return
        kept, scale, squares = [], {}, []
        for k, (t, buf) in enumerate(zip(packed.solo, store)):
            if k in layout.sampled:
                lines = _lines(t)
                kept.append(buf.view(-1)[:lines.numel()].view(lines.shape))
                kept[-1].copy_(lines)
                squares.append(sum_of_squares(t))
                scale[k] = t.numel() / lines.numel()
            else:
                kept.append(buf.copy_(t))
                squares.append(sum_of_squares(buf))  # while the copy is in cache
        self._kept, self._scale = kept, scale
        parts = [torch.stack(squares).sqrt_()] if squares else []
        parts += [torch.linalg.vector_norm(r, dim=1, dtype=_F32) for r in self._rows]
        #: ``||w||`` of each tensor before the update (float32), in the layout's order.
        self.norms = layout.arrange(parts)

    def update_norms(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``||w - w_new||`` of each tensor, given the same tensors after the update (the snapshot is spent)."""
        lay = self.layout
        now = [tensors[i] for i in lay.solo]
        if not lay.cpu:
            if self._kept:
                torch._foreach_sub_(self._kept, now)
            return Packed(lay, self._kept, []).norms()
        squares = []
        for k, (mine, t) in enumerate(zip(self._kept, now)):
            if k in self._scale:
                squares.append(sum_of_squares(mine.sub_(_lines(t))) * self._scale[k])
            else:
                squares.append(sum_of_squares(mine.sub_(t)))
        parts = [torch.stack(squares).sqrt_()] if squares else []
        after = lay.pack(tensors, "after").rows
        parts += [torch.linalg.vector_norm(mine.sub_(theirs), dim=1, dtype=_F32)
                  for mine, theirs in zip(self._rows, after)]
        return lay.arrange(parts)


def _samplable(t: torch.Tensor) -> bool:
    """Whether a weight's update norm is estimated from a sample: a large floating matrix whose rows hold at least
    8 lines, so that each row has one in the sample."""
    line = 64 // t.element_size()
    return (t.is_floating_point() and t.dim() >= 2 and t.numel() >= SAMPLE_MIN
            and t.numel() // t.shape[0] >= 8 * line)


def _lines(t: torch.Tensor) -> torch.Tensor:
    """Every ``SAMPLE_EVERY``-th 64-byte line of ``t`` as a ``(k, line)`` view (a view where ``t`` is contiguous)."""
    line = 64 // t.element_size()
    flat = t.reshape(-1)
    n = flat.numel() // line
    return flat[:n * line].view(n, line)[::SAMPLE_EVERY]


def _squares_into(t: torch.Tensor, out: torch.Tensor) -> None:
    """:func:`sum_of_squares` written into ``out`` (a 0-d float32 tensor)."""
    if t.dtype == _F32 and t.is_contiguous():
        flat = t.view(-1)
        torch.dot(flat, flat, out=out)
    else:
        torch.linalg.vector_norm(t, dtype=_F32, out=out).square_()


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """The sum of squares of one tensor as a float32 0-d tensor: BLAS ``dot`` for contiguous float32 (about 1.6x
    faster than the norm kernel on CPU), the norm kernel otherwise (other dtypes accumulate in float32)."""
    if t.dtype == _F32 and t.is_contiguous():
        flat = t.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(t, dtype=_F32).square()


def count_nonfinite(tensors: Sequence[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
    """CPU: the number of inf/NaN values of each tensor, given their L2 norms: a finite norm means none (reading a
    CPU value costs no sync), so only the tensors with a non-finite norm are counted."""
    bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
    counts = torch.zeros(len(tensors), dtype=_F32)
    for i in bad:
        t = tensors[i]
        counts[i] = float(torch.count_nonzero(t - t))  # t - t is NaN exactly where t is inf or NaN
    return counts


def host_grad_columns(packed: Packed, tensors: Sequence[torch.Tensor], detail: bool) -> list[np.ndarray]:
    """CPU: the gradient columns of a row as NumPy arrays, in the layout's order: ``[L2 norm]``, and on ``detail``
    steps or when a norm is not finite (reading a CPU value costs no sync: it is counted at once) ``[L2 norm, max
    |g|, non-finite count]``. A NaN norm becomes +inf: the gradient is there and not finite (NaN in a row means "no
    gradient"). The L2 array is the layout's buffer (:meth:`Packed.host_norms`), valid until its next call."""
    l2, mx = packed.host_norms(maxima=detail)
    finite = bool(np.isfinite(l2).all())
    cols = [l2]
    if detail or not finite:
        mx = mx if mx is not None else packed.maxima()
        counts = torch.zeros_like(mx) if finite else count_nonfinite(tensors, torch.from_numpy(l2))
        cols += [mx.numpy(), counts.numpy()]
    if not finite:
        l2[np.isnan(l2)] = np.inf
    return cols
