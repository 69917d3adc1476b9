"""FlashInfer's allreduce + residual + RMSNorm kernel: workspaces, support checks, dispatch.

Nothing here runs unless the platform reports ``has_fused_allreduce`` (CUDA with
``flashinfer-python`` importable) and :func:`pre_initialize_allreduce_fusion` has
created a workspace for the group. FlashInfer is imported lazily, at that call.

Why an explicit pre-initialisation and not a lazy workspace on first use:
creating a workspace runs collectives (allgather, broadcast, barrier) over the
group. Lazily, that would happen inside CUDA-graph capture or ``torch.compile``
tracing (SGLang deadlocked there with its custom all-reduce), or on a subset of
ranks (the others never enter the collective). So the strategy calls it once in
``setup``, on every rank of every group, with the same arguments.

Why all ranks agree first: if one rank cannot use the kernel (FlashInfer missing
on one node, an unsupported size) and falls back to ``all_reduce`` while its peers
enter FlashInfer's IPC protocol, both sides wait forever. One all-reduced flag
(``MIN`` over the group's CPU twin) makes the choice collective. After that, the
per-call choice depends only on facts that are equal on every rank of the group
(group size, token count, hidden size, dtype, grad mode), so it needs no further
communication.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from lightning_pp.distributed.objects import broadcast_object
from lightning_pp.distributed.topology import ParallelGroup
from lightning_pp.platform import current_platform

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_GROUP_SIZES",
    "FusionWorkspace",
    "choose_oneshot",
    "destroy_allreduce_fusion_workspaces",
    "find_workspace",
    "make_comm_backend",
    "pre_initialize_allreduce_fusion",
    "run_fused_kernel",
    "unsupported_reason",
]

log = logging.getLogger(__name__)

# FlashInfer's trtllm backend: 2, 4, 8 or 16 ranks; fp16, bf16 and fp32 inputs.
SUPPORTED_GROUP_SIZES = (2, 4, 8, 16)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Group sizes FlashInfer's own one-shot/two-shot heuristic has data for; for other
# supported sizes it would fail looking the size up, so we choose ourselves.
_HEURISTIC_GROUP_SIZES = (2, 4, 8)

# Attributes of ``flashinfer.comm`` this module uses.
_REQUIRED_API = ("create_allreduce_fusion_workspace", "allreduce_fusion", "AllReduceFusionPattern")


# -- pure support checks --------------------------------------------------------------


def unsupported_reason(
    *,
    group_size: int,
    num_tokens: int,
    hidden_size: int,
    dtype: torch.dtype,
    max_num_tokens: Optional[int] = None,
) -> Optional[str]:
    """Why the fused kernel cannot run this problem, or ``None`` when it can.

    Args:
        group_size: ranks in the group.
        num_tokens: rows of the input.
        hidden_size: the last dim.
        dtype: the input dtype.
        max_num_tokens: the workspace's bound; ``None`` skips the check (used when
            sizing a workspace rather than running one).
    """
    if group_size not in SUPPORTED_GROUP_SIZES:
        return f"group size {group_size} is not one of {SUPPORTED_GROUP_SIZES}"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not one of fp16, bf16, fp32"
    if hidden_size < 1:
        return f"hidden size {hidden_size} is empty"
    if num_tokens < 1:
        # NOTE: idle (zero-token) batches still take part in every collective; the
        # fallback's all_reduce handles an empty tensor, the IPC kernel may not.
        return "no tokens (idle batch)"
    if max_num_tokens is not None and num_tokens > max_num_tokens:
        return f"{num_tokens} tokens exceed the workspace bound of {max_num_tokens}"
    return None


def choose_oneshot(num_tokens: int, group_size: int) -> Optional[bool]:
    """One-shot (``True``), two-shot (``False``) or FlashInfer's heuristic (``None``).

    The two-shot algorithm splits the tokens over the ranks, so it needs more
    tokens than ranks; with fewer, only one-shot is correct.
    """
    if num_tokens <= group_size:
        return True
    if group_size in _HEURISTIC_GROUP_SIZES:
        return None
    return False


# -- FlashInfer, imported lazily ------------------------------------------------------


def _import_flashinfer_comm() -> Optional[ModuleType]:
    try:
        comm = importlib.import_module("flashinfer.comm")
    except Exception as exc:  # noqa: BLE001 - a broken CUDA install raises more than ImportError
        log.debug("flashinfer.comm is not importable: %s", exc)
        return None
    return comm if all(hasattr(comm, name) for name in _REQUIRED_API) else None


def _require_flashinfer_comm() -> ModuleType:
    """``flashinfer.comm``, for callers that run only after :func:`_local_reason` found it usable."""
    comm = _import_flashinfer_comm()
    if comm is None:
        raise RuntimeError(
            "flashinfer.comm with the unified allreduce_fusion API is not importable, "
            "but the fused allreduce was asked to use it."
        )
    return comm


def _torch_dist_backend_base() -> Optional[type]:
    try:
        return getattr(importlib.import_module("flashinfer.comm.mnnvl"), "TorchDistBackend", None)
    except Exception:  # noqa: BLE001
        return None


@functools.lru_cache(maxsize=None)
def _subgroup_backend_class(base: type) -> type:
    """Subclass of FlashInfer's ``TorchDistBackend`` that is correct on sub-groups."""

    class SubgroupCommBackend(base):
        """FlashInfer communication backend bound to one :class:`ParallelGroup`.

        Initialised with the device group, so FlashInfer derives ranks and sizes
        from it. ``bcast`` differs from the parent in two ways:

        * ``root`` is a group rank (as in MPI) and is converted explicitly to the
          global rank that ``broadcast_object_list(src=...)`` expects. FlashInfer
          releases before 0.6.13 passed the group rank through, which breaks every
          group that does not contain global rank 0.
        * the broadcast runs over the CPU twin, so no device collective is queued
          (which could interfere with a CUDA graph being captured).
        """

        def __init__(self, group: ParallelGroup) -> None:
            super().__init__(group=group.device_group)
            self.parallel_group = group

        def bcast(self, data: Any, root: int) -> Any:
            return broadcast_object(
                data,
                src=self.parallel_group.global_rank_of(root),
                group=self.parallel_group.cpu_group,
                operation=f"share FlashInfer's workspace handles from rank {root} of the group",
            )

    return SubgroupCommBackend


def make_comm_backend(group: ParallelGroup) -> Any:
    """A FlashInfer ``CommBackend`` for ``group`` (see ``SubgroupCommBackend``)."""
    base = _torch_dist_backend_base()
    if base is None:
        raise RuntimeError(
            "flashinfer.comm.mnnvl.TorchDistBackend is missing: install a flashinfer-python release that "
            "has the unified allreduce_fusion API (pip install -U flashinfer-python)."
        )
    return _subgroup_backend_class(base)(group)


# -- workspaces ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FusionWorkspace:
    """One FlashInfer workspace, for one group, token bound, hidden size and dtype."""

    group: ParallelGroup
    max_num_tokens: int
    hidden_size: int
    dtype: torch.dtype
    handle: Any


# (device group, max tokens, hidden size, dtype) -> workspace. Keyed by the group
# object itself: two groups with the same members (attention-TP and MLP-TP when
# cp == 1) are still different communicators.
_WORKSPACES: dict[tuple[Any, int, int, torch.dtype], FusionWorkspace] = {}


def find_workspace(
    device_group: Any, num_tokens: int, hidden_size: int, dtype: torch.dtype
) -> Optional[FusionWorkspace]:
    """The smallest workspace of ``device_group`` that fits the problem, if any."""
    fits = [
        ws
        for (group, max_tokens, hidden, ws_dtype), ws in _WORKSPACES.items()
        if group is device_group and hidden == hidden_size and ws_dtype == dtype and num_tokens <= max_tokens
    ]
    return min(fits, key=lambda ws: ws.max_num_tokens) if fits else None


def destroy_allreduce_fusion_workspaces() -> None:
    """Frees every workspace; later calls use the fallback until pre-initialised again."""
    for ws in _WORKSPACES.values():
        destroy = getattr(ws.handle, "destroy", None)
        if destroy is not None:
            destroy()
    _WORKSPACES.clear()


def _all_ranks_agree(ok: bool, group: ParallelGroup) -> bool:
    """True only if ``ok`` is true on every rank of ``group`` (one ``MIN`` all-reduce)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group.cpu_group)
    return bool(flag.item())


def _local_reason(group: ParallelGroup, max_num_tokens: int, hidden_size: int, dtype: torch.dtype) -> Optional[str]:
    if not current_platform().has_fused_allreduce:
        return "the platform has no fused allreduce (needs CUDA and flashinfer-python)"
    reason = unsupported_reason(group_size=group.size, num_tokens=max_num_tokens, hidden_size=hidden_size, dtype=dtype)
    if reason is not None:
        return reason
    if _import_flashinfer_comm() is None or _torch_dist_backend_base() is None:
        return "flashinfer.comm lacks the unified allreduce_fusion API"
    return None


def _create_workspace(group: ParallelGroup, max_num_tokens: int, hidden_size: int, dtype: torch.dtype) -> Any:
    comm = _require_flashinfer_comm()
    create = comm.create_allreduce_fusion_workspace
    kwargs: dict[str, Any] = dict(
        # NOTE: pinned to "trtllm". "auto" may pick the MNNVL backend, whose set-up
        # calls CommBackend.Split, i.e. new_group on the group's members only;
        # torch requires every rank of the world to call new_group.
        backend="trtllm",
        world_size=group.size,
        rank=group.rank,  # a group rank: FlashInfer's tp_rank
        max_token_num=max_num_tokens,
        hidden_dim=hidden_size,
        dtype=dtype,
        comm_backend=make_comm_backend(group),
    )
    # Newer releases rendezvous symmetric memory over ``group`` and default to the
    # whole world, which is wrong for a sub-group. Older ones have no such argument.
    params = inspect.signature(create).parameters
    if "group" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs["group"] = group.device_group
    return create(**kwargs)


def pre_initialize_allreduce_fusion(
    groups: Iterable[ParallelGroup],
    *,
    max_num_tokens: int,
    hidden_size: int,
    dtype: torch.dtype,
) -> dict[str, bool]:
    """Creates FlashInfer workspaces for ``groups``, or agrees on the fallback.

    Call it on every rank, during setup, before any CUDA-graph capture or
    compilation, with the groups in the same order on every rank (e.g. a
    topology's ``attn_tp`` then ``mlp_tp``). Every member of a group must make the
    call for it. Safe on any platform: where the kernel is unavailable it costs one
    small all-reduce per group and changes nothing.

    Args:
        groups: the groups whose :func:`allreduce_add_rmsnorm` calls should use the kernel.
        max_num_tokens: the most rows one call will pass; larger calls fall back.
        hidden_size: the last dim of the inputs.
        dtype: the input dtype (a workspace serves one dtype).

    Returns:
        For each group name, whether the kernel will be used for it.
    """
    enabled: dict[str, bool] = {}
    for group in groups:
        if group.size == 1:
            enabled[group.name] = False  # nothing to reduce
            continue
        if group.device_group is None or group.cpu_group is None:
            # The agreement below runs on the CPU twin; without one it would run on
            # the whole world and pair up with unrelated ranks.
            raise ValueError(
                f"group {group.name!r} {group.ranks} needs a device group and a CPU twin: "
                "build it with lightning_pp.distributed.topology.build_topology."
            )
        key = (group.device_group, max_num_tokens, hidden_size, dtype)
        if key in _WORKSPACES:
            enabled[group.name] = True
            continue
        reason = _local_reason(group, max_num_tokens, hidden_size, dtype)
        if not _all_ranks_agree(reason is None, group):
            why = reason or "a peer cannot use it"
            log.info("allreduce fusion off for group %s %s: %s", group.name, group.ranks, why)
            enabled[group.name] = False
            continue
        handle, error = None, None
        try:
            handle = _create_workspace(group, max_num_tokens, hidden_size, dtype)
        except Exception as exc:  # noqa: BLE001 - any failure means: fall back, together
            error = exc
        # NOTE: a rank that fails before FlashInfer's own collectives finish leaves
        # its peers inside them; this second flag only rescues failures after them.
        if not _all_ranks_agree(error is None, group):
            log.warning("allreduce fusion workspace for group %s failed (%s); using the fallback", group.name, error)
            if handle is not None and hasattr(handle, "destroy"):
                handle.destroy()
            enabled[group.name] = False
            continue
        _WORKSPACES[key] = FusionWorkspace(group, max_num_tokens, hidden_size, dtype, handle)
        enabled[group.name] = True
    return enabled


def run_fused_kernel(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    workspace: FusionWorkspace,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs FlashInfer's kARResidualRMSNorm pattern on 2-D contiguous inputs."""
    comm = _require_flashinfer_comm()
    normed = torch.empty_like(x)
    residual_out = torch.empty_like(x)
    comm.allreduce_fusion(
        input=x,
        workspace=workspace.handle,
        pattern=comm.AllReduceFusionPattern.kARResidualRMSNorm,
        launch_with_pdl=False,
        residual_out=residual_out,
        norm_out=normed,
        residual_in=residual,
        rms_gamma=weight.to(x.dtype),
        rms_eps=eps,
        use_oneshot=choose_oneshot(x.shape[0], workspace.group.size),
        # Sum over ranks in fp32, like the contract's statistics. For bf16/fp16 this
        # is slightly more accurate than the fallback's all-reduce in the input dtype.
        fp32_acc=True,
    )
    return normed, residual_out
