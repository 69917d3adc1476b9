"""Where tensors cross ranks inside a pipeline stage.

* :mod:`.collectives` — differentiable all-reduce, copy, token gather/scatter.
* :mod:`.fused_allreduce` — ``allreduce_add_rmsnorm`` with its exact fallback.
* :mod:`.flashinfer_fusion` — FlashInfer's fused kernel: workspaces and dispatch.
"""

from lightning_pp.comm.collectives import (
    all_reduce_sum,
    copy_to_group,
    gather_tokens,
    scatter_tokens,
    split_token_counts,
    token_offsets,
)
from lightning_pp.comm.flashinfer_fusion import (
    destroy_allreduce_fusion_workspaces,
    pre_initialize_allreduce_fusion,
)
from lightning_pp.comm.fused_allreduce import allreduce_add_rmsnorm

__all__ = [
    "all_reduce_sum",
    "allreduce_add_rmsnorm",
    "copy_to_group",
    "destroy_allreduce_fusion_workspaces",
    "gather_tokens",
    "pre_initialize_allreduce_fusion",
    "scatter_tokens",
    "split_token_counts",
    "token_offsets",
]
