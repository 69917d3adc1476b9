"""``allreduce_add_rmsnorm``: the all-reduce that ends a row-parallel layer, fused with
the residual add and the RMSNorm that follow it.

Contract, for ``x`` and ``residual`` of shape ``[..., H]`` on every rank of ``group``::

    residual_out = sum_{ranks r} x_r + residual
    normed       = residual_out * rsqrt(mean(residual_out ** 2, dim=-1) + eps) * weight

The add, the mean of squares and the normalisation run in fp32; both outputs are
rounded once, to the input dtype (fp32, bf16 or fp16). ``normed`` is computed from
the fp32 ``residual_out``, not from its rounded copy, as FlashInfer's fused
kernels do. The sum over ranks runs in the input dtype by the fallback (what the
device backend does for an ordinary all-reduce) and in fp32 by the kernel.

Two implementations, chosen per call:

* the fallback, on every device: one all-reduce, then elementwise ops. It is
  differentiable (the gradient of the replicated sum passes through, as in
  Megatron-LM's row-parallel layers);
* FlashInfer's kernel (see :mod:`.flashinfer_fusion`), when the group was
  pre-initialised and the problem is supported. Inference only: calls that need
  gradients take the fallback.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from lightning_pp.distributed.collectives import (
    GroupLike,
    all_reduce_sum,
    device_group_of,
    group_size,
)
from lightning_pp.parallel import flashinfer_fusion
from lightning_pp.platform import current_platform

__all__ = ["allreduce_add_rmsnorm", "rmsnorm_fp32"]


def rmsnorm_fp32(summed: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of an fp32 tensor over its last dim, in fp32."""
    return summed * torch.rsqrt(summed.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()


def _check(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape.")
    if x.dtype != residual.dtype:
        raise ValueError(f"x is {x.dtype} but residual is {residual.dtype}: cast one of them so they match.")
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1] if x.dim() else '?'},), got {tuple(weight.shape)}.")
    if x.dtype not in flashinfer_fusion.SUPPORTED_DTYPES:
        raise ValueError(f"allreduce_add_rmsnorm supports fp32, bf16 and fp16 inputs, got {x.dtype}.")


def _kernel_workspace(
    x: torch.Tensor, residual: torch.Tensor, group: GroupLike
) -> Optional[flashinfer_fusion.FusionWorkspace]:
    """The workspace to run the kernel with, or ``None`` for the fallback.

    Every condition is equal on all ranks of the group (same shapes, dtype, group
    and grad mode), so all ranks choose alike without communicating.
    """
    platform = current_platform()
    if not platform.has_fused_allreduce or x.device.type != platform.device_type:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad):
        return None
    size = group_size(group)
    num_tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if flashinfer_fusion.unsupported_reason(
        group_size=size, num_tokens=num_tokens, hidden_size=x.shape[-1], dtype=x.dtype
    ):
        return None
    device_group = device_group_of(group)
    if device_group is None and dist.is_initialized():
        device_group = dist.group.WORLD
    return flashinfer_fusion.find_workspace(device_group, num_tokens, x.shape[-1], x.dtype)


def allreduce_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float = 1e-6,
    group: GroupLike = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums ``x`` over ``group``, adds ``residual``, and RMS-normalises the result.

    Args:
        x: this rank's partial sum, ``[..., H]`` (e.g. a row-parallel layer's output).
        residual: the residual stream, same shape and dtype, equal on all ranks.
        weight: the RMSNorm weight, ``[H]``.
        eps: added to the mean of squares.
        group: a :class:`~lightning_pp.distributed.topology.ParallelGroup`, a ``ProcessGroup``,
            or ``None`` for the default group (a single process when
            ``torch.distributed`` is not initialised).

    Returns:
        ``(normed, residual_out)``, both shaped and typed like ``x``.
    """
    _check(x, residual, weight)
    workspace = _kernel_workspace(x, residual, group)
    if workspace is not None:
        shape = x.shape
        normed, residual_out = flashinfer_fusion.run_fused_kernel(
            x.reshape(-1, shape[-1]).contiguous(),
            residual.reshape(-1, shape[-1]).contiguous(),
            weight,
            eps,
            workspace,
        )
        return normed.view(shape), residual_out.view(shape)
    reduced = all_reduce_sum(x, group)
    summed = reduced.float() + residual.float()
    return rmsnorm_fp32(summed, weight, eps).to(x.dtype), summed.to(x.dtype)
