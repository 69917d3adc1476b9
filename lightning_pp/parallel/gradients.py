"""Gradients across pipeline stages and data-parallel replicas.

Nothing here knows Lightning; the strategy calls these after its schedule ran.

* :func:`reduce_stage_gradients` averages each stage's gradients over its
  data-parallel replicas and sums the gradients of parameters that live outside
  the pipelined ``nn.Sequential`` (every rank holds a copy; only the first and/or
  last stage use them) over the pipeline. Gradients travel in one flat buffer per
  dtype and device, not one collective per parameter.
* :func:`clip_grad_norm_across_stages` is ``torch.nn.utils.clip_grad_norm_`` with
  the norm of the *whole* model: each rank sums the squares of the gradients it
  alone counts (its stage's; one copy of anything held twice) and the replica
  adds them up.
* :func:`sync_found_inf` makes every rank skip an fp16 step together.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_pp.distributed.errors import named_failures

__all__ = [
    "clip_grad_norm_across_stages",
    "grad_norm_across_stages",
    "reduce_stage_gradients",
    "sum_over_group",
    "sync_found_inf",
]


def _all_reduce_flat(
    tensors: Sequence[Tensor], group: Optional[dist.ProcessGroup], scale: float = 1.0, *, operation: str
) -> None:
    """Sums ``tensors`` over ``group`` in place, one collective per (dtype, device).

    ``operation`` completes "Global rank 3 could not ..." in the error a lost peer raises.
    """
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        with named_failures(operation, group):
            dist.all_reduce(flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def sum_over_group(
    tensors: Sequence[Tensor],
    group: Optional[dist.ProcessGroup],
    *,
    operation: str = "sum partial gradients over their group",
) -> None:
    """Sums ``tensors`` in place over ``group`` (nothing to do for ``None``, a group of one)."""
    if group is not None and tensors:
        _all_reduce_flat(tensors, group, operation=operation)


def reduce_stage_gradients(
    params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    *,
    shared: Callable[[Tensor], bool],
    pp_group: Optional[dist.ProcessGroup],
    pp_size: int,
    dp_group: Optional[dist.ProcessGroup],
    dp_size: int,
) -> list[Optional[Tensor]]:
    """Returns ``grads`` summed over the pipeline (for ``shared`` parameters) and averaged over replicas.

    A missing gradient becomes zeros wherever a collective needs it, so every rank
    of a group reduces the same tensors in the same order.
    """
    out = list(grads)
    for i, (p, grad) in enumerate(zip(params, grads)):
        needs = dp_size > 1 or (shared(p) and pp_size > 1)
        if grad is None and needs:
            out[i] = torch.zeros_like(p)
    if pp_size > 1:
        pipeline_copies = [g for p, g in zip(params, out) if shared(p) and g is not None]
        if pipeline_copies:
            _all_reduce_flat(
                pipeline_copies,
                pp_group,
                operation="sum the gradients of the parameters outside the pipelined Sequential over the pipeline",
            )
    if dp_size > 1:
        _all_reduce_flat(
            [g for g in out if g is not None],
            dp_group,
            scale=1.0 / dp_size,
            operation="average the gradients over the data-parallel replicas",
        )
    return out


def clip_grad_norm_across_stages(
    param_groups: Iterable[dict[str, Any]],
    max_norm: Union[int, float],
    *,
    counted: Callable[[Tensor], bool],
    group: Optional[dist.ProcessGroup],
    device: torch.device,
) -> Tensor:
    """Scales gradients so that the norm over all stages is at most ``max_norm``; returns that norm.

    Args:
        counted: whether this rank's copy of a parameter enters the norm (a tensor
            held by several ranks counts on one of them only).
        group: every rank holding part of the model (one data-parallel replica);
            ``None`` when that is this rank alone.
    """
    params = [p for group in param_groups for p in group["params"] if p.grad is not None]
    total_norm = grad_norm_across_stages(params, counted=counted, group=group, device=device, why="gradient clipping")
    # The same formula as torch.nn.utils.clip_grad_norm_, applied with one fused multiply per device and dtype.
    torch.nn.utils.clip_grads_with_norm_(params, float(max_norm), total_norm)
    return total_norm


def grad_norm_across_stages(
    params: Iterable[Tensor],
    *,
    counted: Callable[[Tensor], bool],
    group: Optional[dist.ProcessGroup],
    device: torch.device,
    why: str,
) -> Tensor:
    """The 2-norm of the gradients of the whole model, every stage's; every rank of ``group`` must call it.

    Args:
        params: this rank's parameters (those without a gradient are left out).
        counted: whether this rank's copy of a parameter enters the norm (a tensor
            held by several ranks counts on one of them only).
        group: every rank holding part of the model (one data-parallel replica);
            ``None`` when that is this rank alone.
        why: what the norm is for, for the error when a rank is lost.
    """
    counted_grads = [p.grad.detach() for p in params if p.grad is not None and counted(p)]
    # Per-tensor norms in the gradients' own dtype, as torch.nn.utils.clip_grad_norm_ takes
    # them on one device (no float64 copy of every gradient); only the squared local norm,
    # one scalar, goes over the group, in float32.
    if counted_grads:
        local = torch.nn.utils.get_total_norm(counted_grads, 2.0).to(device=device, dtype=torch.float32).pow(2)
    else:
        local = torch.zeros((), dtype=torch.float32, device=device)
    if group is not None:
        with named_failures(f"add up the gradient norm over the ranks of the replica ({why})", group):
            dist.all_reduce(local, group=group)
    return local.sqrt()


def sync_found_inf(scaler: Any) -> None:
    """Makes every rank skip (or take) an fp16 optimizer step together.

    NOTE: ``GradScaler.unscale_`` looks for inf/NaN only in this rank's gradients.
    One stage skipping a step that another takes would split the model, and their
    loss scales would drift apart; so the finding is all-reduced (max) over the world.
    """
    if getattr(scaler.unscale_, "_lightning_pp_synced", False):
        return
    unscale = scaler.unscale_

    def unscale_(optimizer: Any) -> None:
        unscale(optimizer)
        for found_inf in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            with named_failures("agree with every rank whether the fp16 gradients overflowed (GradScaler)"):
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)

    unscale_._lightning_pp_synced = True  # type: ignore[attr-defined]
    scaler.unscale_ = unscale_
