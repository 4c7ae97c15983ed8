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
missing gradients), and its buffers are reused every step. Every figure stays a tensor on the tensors' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Layout", "Packed", "count_nonfinite", "sum_of_squares"]

#: Tensors under this many elements are packed (``cat``) with the others of their shape. Around 4K elements a
#: tensor's own kernel launch (~3 us) costs about what copying it costs; below, packing wins.
GROUP_MAX = 1 << 13
#: At most this many elements are packed per buffer set (the rest are measured in place): memory stays bounded.
GROUP_CAP = 1 << 22

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
        parts = [torch.stack([sum_of_squares(t) for t in self.solo]).sqrt_()] if self.solo else []
        parts += [torch.linalg.vector_norm(r, dim=1, dtype=_F32) for r in self.rows]
        return lay.arrange(parts)

    def maxima(self) -> torch.Tensor:
        """The max |x| of each tensor (NaN where it holds a NaN; 0 for an empty one), CPU only."""
        lay = self.layout
        parts = []
        if self.solo:
            lo, hi = zip(*(torch.aminmax(t) if t.numel() else (lay.zero, lay.zero) for t in self.solo))
            parts.append(torch.maximum(torch.stack(hi).to(_F32), torch.stack(lo).to(_F32).neg()))
        for r in self.rows:
            lo, hi = torch.aminmax(r, dim=1)
            parts.append(torch.maximum(hi.to(_F32), lo.to(_F32).neg()))
        return lay.arrange(parts)

    def sub_(self, other: Packed) -> Packed:
        """In place: ``self - other``, tensor by tensor (``self`` must own its solo tensors: a snapshot)."""
        if self.solo:
            torch._foreach_sub_(self.solo, other.solo)
        for mine, theirs in zip(self.rows, other.rows):
            mine.sub_(theirs)
        return self


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
        order = self.solo + [i for members, _, _ in self.groups for i in members]
        # Results come solo first, then each group: scattered back to the tensors' order (None: already in it).
        self._order = None if order == list(range(self.n)) else torch.tensor(order, device=device)
        self._buffers: dict[str, list[torch.Tensor]] = {}

    def pack(self, tensors: Sequence[torch.Tensor], into: str, *,
             solo_store: list[torch.Tensor] | None = None) -> Packed:
        """The tensors packed into the row buffers named ``into`` (made once, reused). ``solo_store``: copy the
        large tensors into these buffers too (a snapshot); otherwise they are measured where they are."""
        rows = []
        if self.groups:
            bufs = self._buffers.get(into)
            if bufs is None:
                bufs = self._buffers[into] = [torch.empty((len(m) * shape[0], *shape[1:]), dtype=dtype,
                                                          device=self.device) for m, shape, dtype in self.groups]
            for (members, _, _), buf in zip(self.groups, bufs):
                torch.cat([tensors[i] for i in members], out=buf)
                rows.append(buf.view(len(members), -1))
        solo = [tensors[i] for i in self.solo]
        if solo_store is not None and solo:
            torch._foreach_copy_(solo_store, solo)
            solo = solo_store
        return Packed(self, solo, rows)

    def arrange(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-tensor results, given solo first and then group by group, in the tensors' order."""
        flat = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else self.zeros
        if self._order is None:
            return flat
        return torch.empty_like(flat).index_copy_(0, self._order, flat)


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
