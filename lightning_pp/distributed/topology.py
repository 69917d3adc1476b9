"""Rank layout of a (pp, dp, cp, tp) mesh, and the process groups built from it.

Two halves, kept apart on purpose:

* Pure functions (:func:`rank_of`, :func:`coords_of`, :func:`axis_groups`,
  :func:`attn_tp_groups`, :func:`mlp_tp_groups`) answer "which global ranks form
  each group" from the mesh shape alone, with no process group, so they are tested
  as tables.
* :func:`build_topology` creates the real groups and returns a
  :class:`RankTopology` of :class:`ParallelGroup` handles;
  :func:`destroy_topology` destroys them again.

Every group is created with the same ``timeout``: ``new_group`` without one gets
the backend's default (30 minutes on gloo), not the timeout given to
``init_process_group``, and so do the sub-groups of a ``DeviceMesh``
(``init_device_mesh`` in torch 2.13; only an axis spanning the whole world, which
reuses the default group, keeps its timeout). Measured on 4 gloo ranks initialised
with a 3 s timeout: a ``DeviceMesh`` sub-group reports ``0:30:00``, and a collective
on it that a member skips was still waiting after 12 s. So the axis groups are made
here too, with ``new_group(timeout=...)``, and handed to ``DeviceMesh.from_group``.

Layout: ``tp`` is the innermost (fastest-varying) axis, then ``cp``, ``dp``, ``pp``::

    global_rank = ((pp * DP + dp) * CP + cp) * TP + tp

so tensor-parallel peers are neighbours (usually one node), and a pipeline stage
is one contiguous block of ``DP * CP * TP`` ranks.

Derived groups (as in SGLang's context parallelism):

* **attention-TP** = the ``tp`` axis: attention heads are split over ``TP`` ranks,
  while the ``CP`` ranks of a stage each hold a different slice of the tokens.
* **MLP-TP** = the ``cp`` and ``tp`` axes together (``CP * TP`` ranks, in rank
  order): the MLP is token-wise, so after the attention the token slices are
  gathered over ``cp`` and the MLP weights are split over all ``CP * TP`` ranks.
  Reducing the MLP output over the attention-TP group instead was SGLang's bug
  with context parallelism (PR 21249): it silently drops the other slices'
  partial sums.

Group ranks and global ranks are different numbers. A group rank is a position in
:attr:`ParallelGroup.ranks`; convert with :meth:`ParallelGroup.global_rank_of`
and :meth:`ParallelGroup.group_rank_of`, never by passing one where the other is
expected (a group rank used as a global broadcast source broke every sub-group
without global rank 0 in FlashInfer's communication backend).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from lightning_pp.platform import current_platform, distributed_backend_for

__all__ = [
    "AXES",
    "MeshShape",
    "ParallelGroup",
    "RankCoords",
    "RankTopology",
    "attn_tp_groups",
    "axis_groups",
    "build_topology",
    "coords_of",
    "destroy_groups",
    "destroy_topology",
    "global_rank_of",
    "group_rank_of",
    "mlp_tp_groups",
    "process_group_timeout",
    "rank_of",
    "replica_groups",
]

AXES = ("pp", "dp", "cp", "tp")


# -- pure layout -----------------------------------------------------------------------


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the four mesh axes. All must be positive integers."""

    pp: int = 1
    dp: int = 1
    cp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"MeshShape.{axis} must be a positive int, got {size!r}.")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def attn_tp_size(self) -> int:
        """Ranks that split one attention layer's heads (the ``tp`` axis)."""
        return self.tp

    @property
    def mlp_tp_size(self) -> int:
        """Ranks that split one MLP's weights (the ``cp`` and ``tp`` axes together)."""
        return self.cp * self.tp

    def sizes(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp, self.cp, self.tp)


@dataclass(frozen=True)
class RankCoords:
    """A rank's position along each mesh axis."""

    pp: int
    dp: int
    cp: int
    tp: int


def rank_of(coords: RankCoords, shape: MeshShape) -> int:
    """Global rank at ``coords`` (``tp`` fastest, ``pp`` slowest)."""
    for axis in AXES:
        if not 0 <= getattr(coords, axis) < getattr(shape, axis):
            raise ValueError(f"{coords} is outside {shape} on axis {axis!r}.")
    return ((coords.pp * shape.dp + coords.dp) * shape.cp + coords.cp) * shape.tp + coords.tp


def coords_of(rank: int, shape: MeshShape) -> RankCoords:
    """Inverse of :func:`rank_of`."""
    if not 0 <= rank < shape.world_size:
        raise ValueError(f"rank {rank} is outside a mesh of {shape.world_size} ranks ({shape}).")
    rest, tp = divmod(rank, shape.tp)
    rest, cp = divmod(rest, shape.cp)
    pp, dp = divmod(rest, shape.dp)
    return RankCoords(pp=pp, dp=dp, cp=cp, tp=tp)


def _groups_varying(shape: MeshShape, varying: Sequence[str]) -> list[tuple[int, ...]]:
    """Groups of ranks that differ only along ``varying`` axes, in a fixed order.

    Groups are ordered by the fixed axes' coordinates (``pp`` slowest); inside a
    group, ranks ascend. Every rank computes the same list, which is what lets
    every rank create every group in the same order.
    """
    fixed = [axis for axis in AXES if axis not in varying]
    groups = []
    for fixed_coords in itertools.product(*(range(getattr(shape, a)) for a in fixed)):
        base = dict(zip(fixed, fixed_coords))
        members = []
        for var_coords in itertools.product(*(range(getattr(shape, a)) for a in varying)):
            members.append(rank_of(RankCoords(**base, **dict(zip(varying, var_coords))), shape))
        groups.append(tuple(sorted(members)))
    return sorted(groups)


def axis_groups(shape: MeshShape, axis: str) -> list[tuple[int, ...]]:
    """All groups along one axis (``"pp"``, ``"dp"``, ``"cp"`` or ``"tp"``)."""
    if axis not in AXES:
        raise ValueError(f"Unknown mesh axis {axis!r}; expected one of {AXES}.")
    return _groups_varying(shape, [axis])


def attn_tp_groups(shape: MeshShape) -> list[tuple[int, ...]]:
    """Attention-TP groups: the ``tp`` axis."""
    return axis_groups(shape, "tp")


def mlp_tp_groups(shape: MeshShape) -> list[tuple[int, ...]]:
    """MLP-TP groups: the ``cp`` and ``tp`` axes flattened, ``cp``-major."""
    return _groups_varying(shape, ["cp", "tp"])


def replica_groups(shape: MeshShape) -> list[tuple[int, ...]]:
    """The ranks of each data-parallel replica (every ``pp``, ``cp`` and ``tp`` position), by ``dp`` index."""
    return _groups_varying(shape, ["pp", "cp", "tp"])


def global_rank_of(ranks: Sequence[int], group_rank: int) -> int:
    """The global rank at position ``group_rank`` of a group listed as ``ranks``."""
    if not 0 <= group_rank < len(ranks):
        raise ValueError(f"group rank {group_rank} is outside a group of {len(ranks)} ranks {tuple(ranks)}.")
    return int(ranks[group_rank])


def group_rank_of(ranks: Sequence[int], global_rank: int) -> int:
    """The position of ``global_rank`` in a group listed as ``ranks``."""
    try:
        return list(ranks).index(global_rank)
    except ValueError:
        raise ValueError(f"global rank {global_rank} is not a member of group {tuple(ranks)}.") from None


# -- process groups --------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ParallelGroup:
    """One process group as this rank sees it: members, device group and CPU twin.

    Attributes:
        name: ``"tp"``, ``"cp"``, ``"attn_tp"``, ``"mlp_tp"``, ...
        ranks: the members' global ranks, in group-rank order.
        device_group: the group for tensors on the accelerator (``None`` for a group
            of one, which never communicates).
        cpu_group: a group over the same ranks on the CPU backend, for small control
            messages (flags, counts, object broadcasts) that must not enter the
            device queue, e.g. during CUDA-graph capture. On a CPU platform it is the
            device group itself.
    """

    name: str
    ranks: tuple[int, ...]
    device_group: Any = field(default=None, repr=False)
    cpu_group: Any = field(default=None, repr=False)

    @classmethod
    def single(cls, name: str = "single", rank: int = 0) -> "ParallelGroup":
        """A group of one rank: every collective over it is skipped.

        Lets the parallel layers run unsharded in a plain process, without
        ``torch.distributed``.
        """
        return cls(name=name, ranks=(rank,))

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's group rank."""
        if self.size == 1:
            return 0
        return self.group_rank_of(dist.get_rank())

    def global_rank_of(self, group_rank: int) -> int:
        return global_rank_of(self.ranks, group_rank)

    def group_rank_of(self, global_rank: int) -> int:
        return group_rank_of(self.ranks, global_rank)


@dataclass(frozen=True, eq=False)
class RankTopology:
    """Every group this rank belongs to, built by :func:`build_topology`.

    Attributes:
        shape: the mesh shape.
        coords: this rank's mesh coordinates.
        mesh: the ``DeviceMesh`` with dims ``("pp", "dp", "cp", "tp")``.
        pp, dp, cp, tp: groups along one mesh axis.
        attn_tp: attention tensor-parallel group (same members as ``tp``).
        mlp_tp: MLP tensor-parallel group (``cp`` x ``tp``).
        replica: every rank of this rank's data-parallel replica (``pp`` x ``cp`` x
            ``tp``): where a norm of the whole model is summed.
        timeout: the timeout every group was created with (``None``: the backend's default).
        world_cpu: every rank, on the CPU backend: small control messages of the whole
            job (the default group itself where that is already on the CPU, whatever its timeout).
        owned_groups: the process groups :func:`build_topology` created that this rank
            is a member of, in creation order (the default group, reused for an axis
            that spans the world, is not among them): what :func:`destroy_topology` ends.
    """

    shape: MeshShape
    coords: RankCoords
    mesh: Any = field(repr=False)
    pp: ParallelGroup
    dp: ParallelGroup
    cp: ParallelGroup
    tp: ParallelGroup
    attn_tp: ParallelGroup
    mlp_tp: ParallelGroup
    replica: ParallelGroup
    timeout: Optional[timedelta] = None
    world_cpu: Any = field(default=None, repr=False)
    owned_groups: tuple[Any, ...] = field(default=(), repr=False)

    def groups(self) -> dict[str, ParallelGroup]:
        return {g.name: g for g in (self.pp, self.dp, self.cp, self.tp, self.attn_tp, self.mlp_tp, self.replica)}


def process_group_timeout(group: Any, device_type: str = "cpu") -> Optional[timedelta]:
    """The timeout ``group``'s backend for ``device_type`` really runs with, or ``None`` where it does not say.

    NOTE: torch has no public getter; the gloo and NCCL backends expose the options
    they were created with (``options._timeout``), which is what their collectives
    and transfers wait for (checked on gloo: a collective one rank skips fails after
    exactly that long). Other backends answer ``None``.
    """
    try:
        backend = group._get_backend(torch.device(device_type))
    except (AttributeError, RuntimeError, ValueError):
        return None
    options = getattr(backend, "options", None)
    timeout = getattr(options, "_timeout", None)
    return timeout if isinstance(timeout, timedelta) else None


def _new_groups(
    all_ranks: Sequence[tuple[int, ...]], backend: Optional[str], me: int, timeout: Optional[timedelta], owned: list
) -> Any:
    """Creates one group per entry of ``all_ranks`` on every rank; returns this rank's.

    ``torch.distributed.new_group`` is collective over the whole world: every rank
    must call it for every group, in the same order, even for groups it is not in,
    or the ranks' group counters diverge and later groups pair up wrong or hang.
    The group this rank belongs to is appended to ``owned``.
    """
    mine = None
    for ranks in all_ranks:
        group = dist.new_group(list(ranks), backend=backend, timeout=timeout)
        if me in ranks:
            mine = group
            owned.append(group)
    return mine


def build_topology(
    shape: MeshShape, *, device_type: Optional[str] = None, timeout: Optional[timedelta] = None
) -> RankTopology:
    """Creates every process group of the mesh, on every rank, in the same order.

    Must be called by all ranks of an initialised default group whose size is
    ``shape.world_size``. The four axis groups (wrapped in a ``DeviceMesh``), the
    MLP-TP and replica groups, then one CPU twin per group, all come from
    ``new_group`` with ``timeout``. An axis that spans the whole world reuses the
    default group when that already has this timeout (no second communicator over
    every rank).

    Args:
        shape: the mesh shape.
        device_type: device of the mesh; the current platform's by default.
        timeout: how long any collective or transfer on these groups may wait for a
            peer. ``None``: the default group's timeout (the one given to
            ``init_process_group``), where its backend says; else the backend's default.
    """
    from torch.distributed.device_mesh import DeviceMesh

    if not dist.is_initialized():
        raise RuntimeError("build_topology needs torch.distributed: call torch.distributed.init_process_group first.")
    world = dist.get_world_size()
    if world != shape.world_size:
        raise ValueError(
            f"{shape} needs {shape.world_size} ranks but the default group has {world}. "
            "Change the axis sizes so that pp * dp * cp * tp equals the world size."
        )
    device_type = device_type or current_platform().device_type
    me = dist.get_rank()
    default_group = dist.group.WORLD
    world_timeout = process_group_timeout(default_group, device_type)
    reuse_world = timeout is None or timeout == world_timeout
    timeout = timeout if timeout is not None else world_timeout
    owned: list[Any] = []

    def axis_group(axis: str) -> Any:
        all_ranks = axis_groups(shape, axis)
        if len(all_ranks) == 1 and reuse_world:
            return default_group
        return _new_groups(all_ranks, None, me, timeout, owned)

    device_groups = {axis: axis_group(axis) for axis in AXES}
    mesh = DeviceMesh.from_group(
        [device_groups[axis] for axis in AXES],
        device_type,
        mesh=torch.arange(world, dtype=torch.int).reshape(shape.sizes()),
        mesh_dim_names=AXES,
    )

    cpu_backend = distributed_backend_for("cpu")
    on_cpu = current_platform().dist_backend == cpu_backend and device_type == "cpu"

    def make(name: str, all_ranks: list[tuple[int, ...]], device_group: Any) -> ParallelGroup:
        mine = next(r for r in all_ranks if me in r)
        # The twin is created even for groups of one, so every rank makes the same
        # sequence of new_group calls whatever its position.
        cpu_group = device_group if on_cpu else _new_groups(all_ranks, cpu_backend, me, timeout, owned)
        if len(mine) == 1:
            return ParallelGroup(name=name, ranks=mine)
        return ParallelGroup(name=name, ranks=mine, device_group=device_group, cpu_group=cpu_group)

    groups = {axis: make(axis, axis_groups(shape, axis), device_groups[axis]) for axis in AXES}
    mlp_ranks = mlp_tp_groups(shape)
    if shape.cp == 1:
        mlp_tp = ParallelGroup("mlp_tp", groups["tp"].ranks, groups["tp"].device_group, groups["tp"].cpu_group)
    else:
        mlp_tp = make("mlp_tp", mlp_ranks, _new_groups(mlp_ranks, None, me, timeout, owned))
    tp, pp = groups["tp"], groups["pp"]
    if shape.cp * shape.tp == 1:
        replica = ParallelGroup("replica", pp.ranks, pp.device_group, pp.cpu_group)
    else:
        replica_ranks = replica_groups(shape)
        replica = make("replica", replica_ranks, _new_groups(replica_ranks, None, me, timeout, owned))
    world_cpu = default_group if on_cpu else _new_groups([tuple(range(world))], cpu_backend, me, timeout, owned)
    return RankTopology(
        shape=shape,
        coords=coords_of(me, shape),
        mesh=mesh,
        pp=groups["pp"],
        dp=groups["dp"],
        cp=groups["cp"],
        tp=tp,
        attn_tp=ParallelGroup("attn_tp", tp.ranks, tp.device_group, tp.cpu_group),
        mlp_tp=mlp_tp,
        replica=replica,
        timeout=timeout,
        world_cpu=world_cpu,
        owned_groups=tuple(owned),
    )


def destroy_topology(topology: RankTopology) -> None:
    """Destroys the process groups :func:`build_topology` created for ``topology`` (on GPUs: their communicators).

    Every rank must call it at the same point, as they created the groups (tearing
    down a communicator can be collective). Groups already gone (the default group
    was destroyed, which ends every group) are skipped. Nothing may use
    ``topology``'s groups afterwards.
    """
    destroy_groups(topology.owned_groups)


def destroy_groups(groups: Sequence[Any]) -> None:
    """Destroys ``groups`` (made in this order, by every rank alike), newest first; gone ones are skipped."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    # Newest first, as torch destroys the world's groups.
    for group in reversed(list(groups)):
        try:
            dist.destroy_process_group(group)
        except ValueError:  # "Invalid process group specified": no longer registered
            pass
