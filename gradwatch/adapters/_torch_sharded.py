"""FSDP2 / DTensor: per-layer statistics of sharded gradients, with one collective per measured step.

Each rank holds a shard of every gradient (``DTensor`` with ``Shard`` placements). Norms of different kinds
cannot be stacked as DTensors (an L2 norm is a ``_NormPartial``, a max a ``Partial(max)``: redistributing one
into the other is unsupported), so gradwatch works on the local shards: per parameter the sum of squares, the
max |g| and the non-finite count (and, on update steps, the weight's and the update's sum of squares), one
``(5, P)`` row per step. That row is gathered over the mesh dimensions the parameters are sharded on (never over
replicas: an HSDP mesh's replicate dimension holds copies) with one ``all_gather`` per dimension, and reduced
on the device: sums for squares and counts, max for max. Every rank then holds the same global figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradwatch.core.stats import GRAD_MAX, GRAD_NORM, UPDATE_NORM, WEIGHT_NORM

__all__ = ["ShardPlan", "local", "squared_norms"]

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed
    DTensor = Shard = None  # type: ignore[assignment,misc]

_SQUARED = (GRAD_NORM, WEIGHT_NORM, UPDATE_NORM)


def local(t: Any) -> Any:
    """The local shard of a DTensor; any other tensor (or ``None``) as it is."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


@dataclass(frozen=True, slots=True)
class _Group:
    columns: torch.Tensor  # which parameters (columns of the row) are sharded this way
    groups: tuple[Any, ...]  # one process group per sharded mesh dimension
    sizes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """How to turn one rank's local per-parameter sums into global ones.

    Args:
        groups: The sharded parameters grouped by mesh and sharded dimensions (usually one group).
        empty: Parameters whose local shard on this rank is empty (FSDP1 gives them stand-ins).
        stand_ins: FSDP1: for parameters with nothing on this rank (no gradient there), an empty gradient that
            stands in for it, so every rank contributes to every column.
    """

    groups: tuple[_Group, ...]
    empty: frozenset[int]
    stand_ins: dict[int, torch.Tensor] | None = None

    @classmethod
    def build(cls, params: Sequence[torch.nn.Parameter], device: torch.device) -> ShardPlan | None:
        """The plan for these parameters, or ``None`` when none is a sharded DTensor."""
        if DTensor is None:
            return None
        keys: dict[tuple, list[int]] = {}
        meshes: dict[tuple, Any] = {}
        for i, p in enumerate(params):
            if not isinstance(p, DTensor):
                continue
            dims = tuple(d for d, pl in enumerate(p.placements) if isinstance(pl, Shard))
            if not dims:
                continue
            key = (id(p.device_mesh), dims)
            keys.setdefault(key, []).append(i)
            meshes[key] = p.device_mesh
        if not keys:
            return None
        groups = []
        for key, cols in keys.items():
            mesh, dims = meshes[key], key[1]
            idx = torch.tensor(cols, dtype=torch.long, device=device)
            groups.append(_Group(columns=idx, groups=tuple(mesh.get_group(d) for d in dims),
                                 sizes=tuple(mesh.size(d) for d in dims)))
        empty = frozenset(i for i, p in enumerate(params) if local(p).numel() == 0)
        return cls(groups=tuple(groups), empty=empty)

    @classmethod
    def build_fsdp1(cls, root: torch.nn.Module, params: Sequence[torch.nn.Parameter],
                    device: torch.device) -> tuple[ShardPlan, dict[int, tuple[int, ...]]] | None:
        """FSDP1 (``FullyShardedDataParallel``) with ``use_orig_params=True``: every parameter is a flat slice of
        its unit's local shard (empty on some ranks). The plan sums over the units' process group; the second
        value maps each parameter to its original shape. ``None`` when the model has no FSDP1 unit."""
        units = [m for m in root.modules() if type(m).__name__ == "FullyShardedDataParallel"]
        if not units:
            return None
        shapes: dict[int, tuple[int, ...]] = {}
        for unit in units:
            flat = getattr(getattr(unit, "_handle", None), "flat_param", None)
            for p, shape in zip(getattr(flat, "_params", None) or (), getattr(flat, "_shapes", None) or ()):
                shapes[id(p)] = tuple(shape)
        group = units[0].process_group
        import torch.distributed as dist

        cols = torch.arange(len(params), device=device)
        empty = frozenset(i for i, p in enumerate(params) if p.numel() == 0)
        stand_ins = {i: params[i].new_zeros(0) for i in empty}
        plan = cls(groups=(_Group(columns=cols, groups=(group,), sizes=(dist.get_world_size(group),)),),
                   empty=empty, stand_ins=stand_ins)
        return plan, shapes

    def reduce(self, row: torch.Tensor) -> torch.Tensor:
        """A local ``(5, P)`` row (squares in the norm columns) -> the global row (norms), on every rank. Plain
        (unsharded) parameters keep their local figures."""
        import torch.distributed as dist

        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        out = row.clone()
        for g in self.groups:
            part = row[:, g.columns].contiguous()
            for group, size in zip(g.groups, g.sizes):
                everyone = part.new_empty((size * part.shape[0], *part.shape[1:]))  # gloo wants the concatenation
                gather(everyone, part, group=group)
                everyone = everyone.view(size, *part.shape)
                part = everyone.sum(dim=0)
                part[GRAD_MAX] = everyone[:, GRAD_MAX].amax(dim=0)
            out[:, g.columns] = part
        out[list(_SQUARED)] = out[list(_SQUARED)].clamp_min(0).sqrt()
        return out


def squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor, the sum of squares (float32), in one fused kernel where torch has ``_foreach_powsum``."""
    powsum = getattr(torch, "_foreach_powsum", None)
    if powsum is not None:
        return torch.stack(powsum(tensors, 2.0)).float()
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square()

