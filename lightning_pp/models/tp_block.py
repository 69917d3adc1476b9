"""A reference tensor- and context-parallel transformer block.

One block, for rows (tokens) ``x`` of one sequence, with the residual stream
carried beside the normalised hidden states::

    hidden ─► attention ─► partial ─► allreduce_add_rmsnorm(attn-TP, post_attention_norm) ─► h, residual
    h, residual ─► gather over cp ─► MLP ─► partial ─► allreduce_add_rmsnorm(MLP-TP, output_norm)
                ─► keep own rows ─► (normed, residual)

``output_norm`` is the norm of whatever reads the block's output: the next block's
input norm, or the model's final norm. A Llama-style decoder therefore applies a
plain :class:`~lightning_pp.parallel.layers.RMSNorm` once before its first block
and maps checkpoint name ``layers.{i+1}.input_layernorm`` to
``blocks.{i}.output_norm`` (``norm`` to the last block's).

Parallelism (see :mod:`lightning_pp.distributed.topology`):

* attention heads split over **attention-TP** (``q/k/v_proj`` column-parallel,
  ``o_proj`` row-parallel, its partial sums reduced by the first fused call);
* each **cp** rank holds a contiguous slice of the rows. In ``"context"`` mode the
  slices are one sequence (context parallelism): keys and values are all-gathered
  over cp, and each rank attends its queries over all earlier positions, which is
  exact. In ``"data"`` mode each cp rank holds its own sequence (SGLang's DP
  attention): attention stays local, and a rank without tokens runs an idle batch;
* the MLP is split over **MLP-TP** (cp x tp): the rows of all cp ranks are
  gathered first, each rank applies its slice of the MLP weights to all of them,
  and the second fused call reduces over MLP-TP. Reducing over attention-TP there
  would drop the other cp ranks' partial sums (SGLang PR 21249).

Gradients: collectives follow Megatron-LM's convention (see
:mod:`lightning_pp.distributed.collectives`), so each rank's parameter gradients are
exact for the rows it computed. Attention-side parameters (attention projections
and ``post_attention_norm``) see only this rank's rows: their gradients must still
be summed over the cp group, like data parallelism; :meth:`TPTransformerBlock.
cp_partial_parameters` names them. MLP-side parameters see all rows already.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from lightning_pp.distributed.collectives import (
    gather_tokens,
    scatter_tokens,
    token_offsets,
)
from lightning_pp.distributed.topology import ParallelGroup, RankTopology
from lightning_pp.parallel.fused_allreduce import allreduce_add_rmsnorm
from lightning_pp.parallel.layers import (
    ColumnParallelLinear,
    RMSNorm,
    RowParallelLinear,
)

__all__ = ["ATTENTION_MODES", "BlockConfig", "BlockGroups", "ParallelAttention", "SwiGLUMLP", "TPTransformerBlock"]

ATTENTION_MODES = ("context", "data")

# (q, k, q_positions) -> (q, k): where a rotary embedding plugs in, before keys
# are gathered, so each rank rotates only its own rows.
RotaryFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BlockConfig:
    """Sizes of one block.

    Attributes:
        hidden_size: model width.
        num_heads: query heads.
        ffn_hidden_size: SwiGLU inner width.
        num_kv_heads: key/value heads (grouped-query attention); ``num_heads`` by default.
        eps: RMSNorm epsilon.
        attention_mode: ``"context"`` (cp ranks hold slices of one sequence) or
            ``"data"`` (cp ranks hold separate sequences).
    """

    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    num_kv_heads: Optional[int] = None
    eps: float = 1e-6
    attention_mode: str = "context"

    def __post_init__(self) -> None:
        kv = self.kv_heads
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}.")
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {kv}.")
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {self.attention_mode!r}.")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True, eq=False)
class BlockGroups:
    """The three groups a block communicates over."""

    attn_tp: ParallelGroup
    cp: ParallelGroup
    mlp_tp: ParallelGroup

    def __post_init__(self) -> None:
        if self.mlp_tp.size != self.attn_tp.size * self.cp.size:
            raise ValueError(
                f"MLP-TP has {self.mlp_tp.size} ranks but attention-TP x cp is "
                f"{self.attn_tp.size} x {self.cp.size}: build the groups with build_topology."
            )

    @classmethod
    def from_topology(cls, topology: RankTopology) -> "BlockGroups":
        return cls(attn_tp=topology.attn_tp, cp=topology.cp, mlp_tp=topology.mlp_tp)

    @classmethod
    def single(cls) -> "BlockGroups":
        """No parallelism: the block runs unsharded in one process."""
        single = ParallelGroup.single
        return cls(attn_tp=single("attn_tp"), cp=single("cp"), mlp_tp=single("mlp_tp"))


class ParallelAttention(nn.Module):
    """Causal multi-head attention, heads split over attention-TP, rows over cp.

    Returns this rank's *partial* output projection (reduce it over attention-TP).
    """

    def __init__(self, config: BlockConfig, groups: BlockGroups, *, rotary: Optional[RotaryFn] = None) -> None:
        super().__init__()
        tp = groups.attn_tp.size
        if config.num_heads % tp or config.kv_heads % tp:
            raise ValueError(
                f"{config.num_heads} query and {config.kv_heads} key/value heads do not split over "
                f"{tp} attention-TP ranks: choose a tp size that divides both."
            )
        self.config, self.groups, self.rotary = config, groups, rotary
        self.local_heads = config.num_heads // tp
        self.local_kv_heads = config.kv_heads // tp
        hidden, head_dim = config.hidden_size, config.head_dim
        self.q_proj = ColumnParallelLinear(hidden, config.num_heads * head_dim, groups.attn_tp)
        self.k_proj = ColumnParallelLinear(hidden, config.kv_heads * head_dim, groups.attn_tp)
        self.v_proj = ColumnParallelLinear(hidden, config.kv_heads * head_dim, groups.attn_tp)
        self.o_proj = RowParallelLinear(config.num_heads * head_dim, hidden, groups.attn_tp, reduce_output=False)

    def forward(self, x: torch.Tensor, *, token_counts: Sequence[int]) -> torch.Tensor:
        """Attention over this rank's rows ``x`` (``[rows, hidden]``).

        Args:
            x: normalised hidden states of this rank's rows.
            token_counts: every cp rank's row count, in cp-rank order.
        """
        cp = self.groups.cp
        rank = cp.rank
        rows, head_dim = x.shape[0], self.config.head_dim
        q = self.q_proj(x).view(rows, self.local_heads, head_dim)
        k = self.k_proj(x).view(rows, self.local_kv_heads, head_dim)
        v = self.v_proj(x).view(rows, self.local_kv_heads, head_dim)
        if self.config.attention_mode == "context":
            start = token_offsets(token_counts)[rank]
            q_pos = torch.arange(start, start + rows, device=x.device)
            if self.rotary is not None:
                q, k = self.rotary(q, k, q_pos)
            # Every rank's queries read every rank's keys: partial key/value
            # gradients come back from all cp ranks and are summed.
            k = gather_tokens(k, cp, token_counts, grad="sum")
            v = gather_tokens(v, cp, token_counts, grad="sum")
            k_pos = torch.arange(sum(token_counts), device=x.device)
        else:
            q_pos = k_pos = torch.arange(rows, device=x.device)
            if self.rotary is not None:
                q, k = self.rotary(q, k, q_pos)
        out = _causal_attention(q, k, v, q_pos, k_pos)
        return self.o_proj(out.reshape(rows, self.local_heads * head_dim))


def _causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor:
    """Softmax attention in fp32, key ``j`` visible to query ``i`` iff ``k_pos[j] <= q_pos[i]``.

    Shapes: ``q`` ``[Q, H, D]``, ``k``/``v`` ``[K, Hkv, D]``; returns ``[Q, H, D]``.
    Written out (not ``scaled_dot_product_attention``) so that zero queries or
    zero keys (idle batches) are ordinary empty tensors.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    visible = k_pos[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``, split over MLP-TP; returns the partial sum."""

    def __init__(self, config: BlockConfig, groups: BlockGroups) -> None:
        super().__init__()
        hidden, ffn = config.hidden_size, config.ffn_hidden_size
        self.gate_proj = ColumnParallelLinear(hidden, ffn, groups.mlp_tp)
        self.up_proj = ColumnParallelLinear(hidden, ffn, groups.mlp_tp)
        self.down_proj = RowParallelLinear(ffn, hidden, groups.mlp_tp, reduce_output=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TPTransformerBlock(nn.Module):
    """Pre-norm decoder block over attention-TP, cp and MLP-TP groups (see module docstring)."""

    def __init__(self, config: BlockConfig, groups: BlockGroups, *, rotary: Optional[RotaryFn] = None) -> None:
        super().__init__()
        self.config, self.groups = config, groups
        self.attn = ParallelAttention(config, groups, rotary=rotary)
        self.post_attention_norm = RMSNorm(config.hidden_size, eps=config.eps)
        self.mlp = SwiGLUMLP(config, groups)
        self.output_norm = RMSNorm(config.hidden_size, eps=config.eps)

    def allreduce_fusion_groups(self) -> list[tuple[ParallelGroup, int]]:
        """``(group, hidden_size)`` of each fused all-reduce in :meth:`forward`, for setup-time workspaces."""
        hidden = self.config.hidden_size
        return [(self.groups.attn_tp, hidden), (self.groups.mlp_tp, hidden)]

    @torch.no_grad()
    def load_unsharded_(self, full: "TPTransformerBlock") -> None:
        """Copies this rank's shards of an unsharded block's weights (same config, groups of one)."""
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(self.attn, name).load_full_weight_(getattr(full.attn, name).weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self.mlp, name).load_full_weight_(getattr(full.mlp, name).weight)
        self.post_attention_norm.weight.copy_(full.post_attention_norm.weight)
        self.output_norm.weight.copy_(full.output_norm.weight)

    def cp_partial_parameters(self) -> list[str]:
        """Parameters whose gradients must still be summed over the cp group."""
        if self.groups.cp.size == 1:
            return []
        return [name for name, _ in self.named_parameters() if name.startswith(("attn.", "post_attention_norm."))]

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        *,
        token_counts: Optional[Sequence[int]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the block on this rank's rows.

        Args:
            hidden: ``[rows, hidden]``, already normalised by the previous norm.
            residual: ``[rows, hidden]``, the residual stream before this block.
            token_counts: every cp rank's row count, in cp-rank order (zero for a
                rank running an idle batch); may be omitted when cp has one rank.

        Returns:
            ``(normed, residual)`` for this rank's rows: ``residual`` after the
            block, and its ``output_norm``.
        """
        cp, eps = self.groups.cp, self.config.eps
        if token_counts is None:
            if cp.size > 1:
                raise ValueError("token_counts is required when the cp group has more than one rank.")
            token_counts = (hidden.shape[0],)
        token_counts = tuple(int(n) for n in token_counts)
        attn_partial = self.attn(hidden, token_counts=token_counts)
        h, residual = allreduce_add_rmsnorm(
            attn_partial, residual, self.post_attention_norm.weight, eps=eps, group=self.groups.attn_tp
        )
        # The MLP's output is replicated over MLP-TP after its all-reduce, so the
        # gradients reaching the gathered rows are equal on all ranks: keep own rows.
        h_all = gather_tokens(h, cp, token_counts, grad="slice")
        residual_all = gather_tokens(residual, cp, token_counts, grad="slice")
        mlp_partial = self.mlp(h_all)
        normed_all, residual_all = allreduce_add_rmsnorm(
            mlp_partial, residual_all, self.output_norm.weight, eps=eps, group=self.groups.mlp_tp
        )
        return scatter_tokens(normed_all, cp, token_counts), scatter_tokens(residual_all, cp, token_counts)
