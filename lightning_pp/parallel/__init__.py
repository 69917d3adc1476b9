"""Parallelism inside a stage: tensor, context and attention-data parallel layers.

The fused all-reduce + residual + RMSNorm (FlashInfer on CUDA, an exact fallback
elsewhere), parallel linears, DP-attention padding and idle batches, and the
gradient reductions and clipping that span the mesh.
"""

from lightning_pp.parallel.flashinfer_fusion import (
    destroy_allreduce_fusion_workspaces,
    pre_initialize_allreduce_fusion,
)
from lightning_pp.parallel.fused_allreduce import allreduce_add_rmsnorm

__all__ = [
    "allreduce_add_rmsnorm",
    "destroy_allreduce_fusion_workspaces",
    "pre_initialize_allreduce_fusion",
]
