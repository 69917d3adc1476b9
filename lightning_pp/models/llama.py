"""A Llama-architecture decoder built from issue 6's layers, with a per-sequence KV cache.

RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU MLP,
laid out as :class:`~lightning_pp.models.tp_block.TPTransformerBlock` lays out a
block: every norm is fused with the all-reduce that precedes it, so a block ends
with the *next* block's input norm::

    ids ─► embed_tokens ─► input_norm ─► layers[0] ─► ... ─► layers[L-1] ─► lm_head
                          (= HF layers.0.input_layernorm)    (output_norm = HF norm)

Rows are *packed*: one forward call takes the new tokens of several sequences
concatenated (``[rows, hidden]``), described by a :class:`StepRows`. Each layer
keeps the keys and values of every sequence it has seen in a :class:`KVCache`
of its own (a slab that grows by doubling), so a pipeline stage holds exactly the
cache of its layers, and attends over all the sequences of a forward in one
``scaled_dot_product_attention`` call (:func:`attend`).

Parallelism: attention heads split over attention-TP and the MLP over MLP-TP, as
in the block. The block's ``cp`` ranks can only run in ``"data"`` mode here
(data-parallel attention): a KV cache holds whole sequences, so each cp rank
attends over its own sequences, and the MLP runs on the rows of every cp rank,
gathered; a forward with no rows of its own (an *idle* forward) still joins the
gather and the all-reduces. ``"context"`` mode would split one sequence's cache
over ranks, which is not implemented, and is refused.

Loading: :meth:`DecoderLM.from_pretrained` reads a local Hugging Face directory
(``config.json`` and ``*.safetensors``); it never touches the network. A model
loaded unsharded becomes this rank's shards with :meth:`DecoderLM.shard` (or
:func:`shard_layers` for the layers alone).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union, cast

import torch
from torch import nn

from lightning_pp.distributed.collectives import gather_tokens, scatter_tokens
from lightning_pp.distributed.topology import ParallelGroup
from lightning_pp.generation.kv_cache import KVCache, StepRows, host_to_device
from lightning_pp.models.config import DecoderConfig
from lightning_pp.models.tp_block import ATTENTION_MODES, BlockGroups, SwiGLUMLP
from lightning_pp.parallel.fused_allreduce import allreduce_add_rmsnorm
from lightning_pp.parallel.layers import ColumnParallelLinear, RMSNorm, RowParallelLinear

__all__ = [
    "DecoderConfig",
    "DecoderLM",
    "DecoderLayer",
    "KVCache",
    "RotaryEmbedding",
    "StepRows",
    "attend",
    "shard_layers",
]


class RotaryEmbedding:
    """Rotary position embedding, rotating the two halves of each head (Llama's convention).

    ``x · cos(p θ) + rotate_half(x) · sin(p θ)`` with ``θ_i = theta^(-2i / D)``,
    ``rotate_half([x1, x2]) = [-x2, x1]``; angles in fp32.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}.")
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of the rows' angles, ``[rows, 1, D]`` in ``dtype``."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, angles: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    ) -> torch.Tensor:
        """Rotates ``x`` (``[rows, heads, D]``) by its rows' ``positions`` (or precomputed ``angles``)."""
        cos, sin = angles if angles is not None else self.angles(positions, x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CachedAttention(nn.Module):
    """Grouped-query attention over each sequence's cached keys, heads split over attention-TP.

    ``q/k/v_proj`` are column-parallel (with a bias in Qwen2), ``o_proj`` row-parallel;
    the output is this rank's *partial* ``o_proj`` sum (the layer's fused all-reduce
    adds the ranks). Qwen3 normalises each query and key head (``q_norm``, ``k_norm``)
    before the rotary embedding. The new keys and values of a forward go into the
    layer's :class:`KVCache`, then one :func:`attend` call covers every sequence of the
    forward, reading at most ``window`` positions back when the layer slides.
    """

    def __init__(
        self,
        config: DecoderConfig,
        groups: BlockGroups,
        rotary: RotaryEmbedding,
        *,
        attention_mode: str = "context",
        window: Optional[int] = None,
    ) -> None:
        super().__init__()
        tp = groups.attn_tp.size
        heads, kv_heads, head_dim = config.num_heads, config.kv_heads, config.attn_head_dim
        if heads % tp or kv_heads % tp:
            raise ValueError(
                f"{heads} query and {kv_heads} key/value heads do not split over {tp} attention-TP ranks: "
                "choose a tp size that divides both."
            )
        if groups.cp.size != 1 and attention_mode != "data":
            raise ValueError(
                f"DecoderLM keeps a whole sequence's cache on one rank, so its {groups.cp.size} cp ranks cannot split "
                f"one sequence (attention_mode={attention_mode!r}): use attention_mode='data' (each cp rank "
                "runs its own sequences, data-parallel attention) or a cp size of 1."
            )
        self.groups, self.head_dim, self.window = groups, head_dim, window
        self.local_heads, self.local_kv_heads = heads // tp, kv_heads // tp
        hidden, bias = config.hidden_size, config.qkv_bias
        self.q_proj = ColumnParallelLinear(hidden, heads * head_dim, groups.attn_tp, bias=bias)
        self.k_proj = ColumnParallelLinear(hidden, kv_heads * head_dim, groups.attn_tp, bias=bias)
        self.v_proj = ColumnParallelLinear(hidden, kv_heads * head_dim, groups.attn_tp, bias=bias)
        self.o_proj = RowParallelLinear(heads * head_dim, hidden, groups.attn_tp, reduce_output=False)
        # Added by attention-TP rank 0 only: the all-reduce after o_proj sums the ranks' partials.
        self.o_bias = nn.Parameter(torch.zeros(hidden)) if config.o_bias else None
        self.q_norm = RMSNorm(head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.rope = rotary

    def forward(self, x: torch.Tensor, *, rows: StepRows, cache: KVCache) -> torch.Tensor:
        """This rank's partial ``o_proj`` output for the packed rows ``x``."""
        n, head_dim = x.shape[0], self.head_dim
        positions = rows.positions(x.device)
        # The angles depend on the rows only: every layer of the forward shares them.
        angles = rows.memo(("rope", id(self.rope), x.device, x.dtype), lambda: self.rope.angles(positions, x.dtype))
        q = self.q_proj(x).view(n, self.local_heads, head_dim)
        k = self.k_proj(x).view(n, self.local_kv_heads, head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, positions, angles), self.rope(k, positions, angles)
        v = self.v_proj(x).view(n, self.local_kv_heads, head_dim)
        if rows.seq_ids:  # an idle forward has no rows, but o_proj's shape and the collectives after it
            cache.write(rows, k, v)
            keys, values = cache.batch(rows.seq_ids, max(rows.ends))
            q = attend(q, keys, values, rows, window=self.window)
        out = self.o_proj(q.reshape(n, self.local_heads * head_dim))
        if self.o_bias is not None and self.groups.attn_tp.rank == 0:
            out = out + self.o_bias
        return out


@dataclass(frozen=True)
class _AttentionLayout:
    """How a forward's packed rows sit in the padded batch that :func:`attend` hands to SDPA.

    Attributes:
        max_new: queries per sequence after padding (the most new rows of a sequence).
        max_len: keys per sequence after padding (the longest sequence after this forward).
        padded_index: each packed row's place in the flattened ``[B * max_new]`` queries;
            ``None`` when every sequence has ``max_new`` rows (the packed rows are the batch).
        mask: ``[B, 1, max_new, max_len]``, ``True`` where a query may read a key;
            ``None`` when no key needs masking, or when ``causal`` does it.
        causal: SDPA's own causal mask is the right one (every sequence fresh, same length).
    """

    max_new: int
    max_len: int
    padded_index: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    causal: bool


def _attention_layout(rows: StepRows, device: torch.device, window: Optional[int] = None) -> _AttentionLayout:
    num_new, start, ends = rows.num_new, rows.start, rows.ends
    max_new, max_len = max(num_new), max(ends)
    uniform = min(num_new) == max_new
    # A window only hides keys once some query sits ``window`` or more positions in.
    slides = window is not None and max_len > window
    padded_index = None
    if not uniform:
        counts = torch.tensor(num_new, dtype=torch.long)
        within = torch.arange(rows.num_rows) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        padded = torch.repeat_interleave(torch.arange(len(num_new)), counts) * max_new + within
        padded_index = host_to_device(padded, device)
    if uniform and max(start) == 0 and not slides:  # fresh sequences of one length: plain causal attention
        return _AttentionLayout(max_new, max_len, None, None, causal=max_new > 1)
    if uniform and max_new == 1 and min(ends) == max_len and not slides:  # one decode token each, equal lengths
        return _AttentionLayout(max_new, max_len, None, None, causal=False)
    # Query t of sequence i sits at position start_i + t and reads keys 0..start_i + t (the last
    # ``window`` of them when the layer slides). A padding query (t >= num_new_i) reads key 0
    # only: a row with no key at all would be NaN.
    t = torch.arange(max_new)
    q_pos = torch.tensor(start, dtype=torch.long)[:, None] + t[None, :]
    q_pos = torch.where(t[None, :] < torch.tensor(num_new)[:, None], q_pos, torch.zeros_like(q_pos))
    k_pos = torch.arange(max_len)[None, None, :]
    mask = k_pos <= q_pos[:, :, None]
    if window is not None and slides:
        mask &= k_pos > q_pos[:, :, None] - window
    return _AttentionLayout(max_new, max_len, padded_index, host_to_device(mask[:, None], device), causal=False)


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: StepRows, *, window: Optional[int] = None
) -> torch.Tensor:
    """Causal attention of every sequence's new queries over its cached keys, in one SDPA call.

    ``out[r] = softmax(q[r] · K_i^T / sqrt(D)) V_i`` over keys ``0..p`` of the row's
    sequence ``i``, where ``p`` is the row's position: causal within the new rows, the
    whole cached prefix, nothing of other sequences. With a sliding ``window`` only
    keys ``p - window + 1 .. p`` (Mistral's and Hugging Face's convention). Grouped-query attention: query
    head ``h`` reads key/value head ``h // (H / Hkv)``.

    The packed queries are padded to the longest sequence's new rows (a view when
    all sequences have as many, as in a decode step; a forward mixing one-row
    decode steps with prefills attends the two apart, see
    :meth:`~lightning_pp.generation.kv_cache.StepRows.decode_split`) and the keys to the longest
    sequence; a boolean mask hides the padding and the future. In a decode step the
    query heads that share a key/value head become that head's rows of queries, so
    each cached key is read once, not once per query head.

    Args:
        q: ``[rows.num_rows, H, D]``, the new rows' queries, packed.
        keys, values: ``[B, Hkv, L, D]`` with ``L >= max(rows.ends)``: sequence
            ``rows.seq_ids[i]``'s keys in batch entry ``i``, its new ones included
            (what :meth:`KVCache.batch` returns).
        rows: the forward's sequences.

    Returns:
        ``[rows.num_rows, H, D]``, packed like ``q``.
    """
    num_seqs, (n, heads, head_dim) = len(rows.seq_ids), q.shape
    if num_seqs == 0:
        return q.new_zeros(0, heads, head_dim)
    split = rows.decode_split(q.device)
    if split is not None:  # decode steps beside prefills: attend apart rather than pad each decode row to a prompt
        out = torch.empty_like(q)
        last = attend(q.index_select(0, split.last_rows), keys, values, split.last, window=window)
        out.index_copy_(0, split.decode_rows, last.index_select(0, split.decode_seqs))
        k, v = keys.index_select(0, split.prefill_seqs), values.index_select(0, split.prefill_seqs)
        return out.index_copy_(0, split.prefill_rows, attend(q[split.prefill_rows], k, v, split.prefill, window=window))
    layout = rows.memo(("attention", q.device, window), lambda: _attention_layout(rows, q.device, window))
    kv_heads = keys.shape[1]
    keys, values = keys[:, :, : layout.max_len], values[:, :, : layout.max_len]
    if layout.max_new == 1 and heads != kv_heads:
        # Decode: [B, H, D] -> [B, Hkv, H / Hkv, D]; a [B, 1, 1, L] mask broadcasts over the group.
        out = torch.nn.functional.scaled_dot_product_attention(
            q.view(num_seqs, kv_heads, heads // kv_heads, head_dim), keys, values, attn_mask=layout.mask
        )
        return out.reshape(n, heads, head_dim)
    if layout.padded_index is None:
        padded = q.view(num_seqs, layout.max_new, heads, head_dim)
    else:
        padded = q.new_zeros(num_seqs * layout.max_new, heads, head_dim).index_copy_(0, layout.padded_index, q)
        padded = padded.view(num_seqs, layout.max_new, heads, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        padded.transpose(1, 2),
        keys,
        values,
        attn_mask=layout.mask,
        is_causal=layout.causal,
        enable_gqa=heads != kv_heads,
    ).transpose(1, 2)  # [B, max_new, H, D]
    if layout.padded_index is None:
        return out.reshape(n, heads, head_dim)
    return out.reshape(num_seqs * layout.max_new, heads, head_dim).index_select(0, layout.padded_index)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer; takes normalised hidden states and returns the next layer's input.

    ``(hidden, residual) -> (output_norm(r'), r')`` with
    ``r' = h + mlp(post_attention_norm(h))`` and ``h = residual + attn(hidden)``.

    With data-parallel attention (a cp group of several ranks, ``attention_mode="data"``)
    the attention and its attention-TP all-reduce see this rank's rows only; the
    rows of every cp rank are then gathered, the MLP (split over MLP-TP = cp x tp)
    runs on all of them, and this rank keeps its own rows after the MLP-TP
    all-reduce, as :class:`~lightning_pp.models.tp_block.TPTransformerBlock` does.

    Args:
        config: model sizes.
        groups: the attention-TP, cp and MLP-TP groups.
        rotary: the rotary embedding (shared by the layers of a model).
        attention_mode: ``"context"`` (cp must then have one rank) or ``"data"``.
        window: this layer's sliding window (``None``: full attention).
    """

    def __init__(
        self,
        config: DecoderConfig,
        groups: BlockGroups,
        rotary: RotaryEmbedding,
        *,
        attention_mode: str = "context",
        window: Optional[int] = None,
    ) -> None:
        super().__init__()
        block = config.block_config(attention_mode)
        self.eps, self.groups, self.attention_mode = block.eps, groups, attention_mode
        self.attn = CachedAttention(config, groups, rotary, attention_mode=attention_mode, window=window)
        self.post_attention_norm = RMSNorm(block.hidden_size, eps=block.eps)
        self.mlp = SwiGLUMLP(block, groups)
        self.output_norm = RMSNorm(block.hidden_size, eps=block.eps)

    def allreduce_fusion_groups(self) -> list[tuple[ParallelGroup, int]]:
        """``(group, hidden_size)`` of each fused all-reduce in :meth:`forward`, for setup-time workspaces."""
        hidden = self.output_norm.weight.shape[0]
        return [(self.groups.attn_tp, hidden), (self.groups.mlp_tp, hidden)]

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor, *, rows: StepRows, cache: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the layer on this rank's packed rows (zero rows for an idle forward).

        Collective over attention-TP, and with data-parallel attention over cp and
        MLP-TP too: every attention-DP rank must call it for the same forward, each
        with ``rows.dp_num_rows`` listing every rank's row count.
        """
        partial = self.attn(hidden, rows=rows, cache=cache)
        h, residual = allreduce_add_rmsnorm(
            partial, residual, self.post_attention_norm.weight, eps=self.eps, group=self.groups.attn_tp
        )
        cp = self.groups.cp
        if cp.size == 1:
            return allreduce_add_rmsnorm(
                self.mlp(h), residual, self.output_norm.weight, eps=self.eps, group=self.groups.mlp_tp
            )
        counts = self._dp_counts(rows)
        # The MLP's output is replicated over MLP-TP after its all-reduce, so each
        # rank only keeps its own rows of it (gather grad "slice", as in the block).
        h_all = gather_tokens(h, cp, counts)
        residual_all = gather_tokens(residual, cp, counts)
        normed_all, residual_all = allreduce_add_rmsnorm(
            self.mlp(h_all), residual_all, self.output_norm.weight, eps=self.eps, group=self.groups.mlp_tp
        )
        return scatter_tokens(normed_all, cp, counts), scatter_tokens(residual_all, cp, counts)

    def _dp_counts(self, rows: StepRows) -> tuple[int, ...]:
        counts = rows.dp_num_rows
        size = self.groups.cp.size
        if counts is None or len(counts) != size:
            raise ValueError(
                f"data-parallel attention over {size} cp ranks gathers every rank's rows for the MLP, but "
                f"StepRows.dp_num_rows is {counts}: pass one row count per attention-DP rank (PipelineGenerator "
                "does so when its StageContext names the attention-DP group)."
            )
        return counts


class DecoderLM(nn.Module):
    """A Llama-style causal LM: ``embed_tokens``, ``input_norm``, ``layers`` (an ``nn.Sequential``), ``lm_head``.

    Args:
        config: model sizes.
        groups: tensor-parallel groups of the attention and MLP, and the cp group;
            ``None`` runs unsharded with no process group.
        attention_mode: ``"data"`` lets a cp group of several ranks run
            data-parallel attention; ``"context"`` (the default) needs cp size 1.
    """

    def __init__(
        self, config: DecoderConfig, groups: Optional[BlockGroups] = None, *, attention_mode: str = "context"
    ) -> None:
        super().__init__()
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {attention_mode!r}.")
        self.config, self.attention_mode = config, attention_mode
        groups = groups or BlockGroups.single()
        rotary = RotaryEmbedding(config.attn_head_dim, config.rope_theta)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.input_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = nn.Sequential(
            *(
                DecoderLayer(config, groups, rotary, attention_mode=attention_mode, window=config.window_of(i))
                for i in range(config.num_layers)
            )
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # The three pieces a pipeline stage runs; see lightning_pp.generation.engine.
    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_norm(x), x)`` for token ids ``[rows]``: the first layer's input."""
        x = self.embed_tokens(ids)
        return self.input_norm(x), x

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's (already normalised) output."""
        return self.lm_head(normed)

    @torch.no_grad()
    def shard(self, groups: BlockGroups, *, attention_mode: str = "context") -> "DecoderLM":
        """A new model holding this rank's shards of this (unsharded) model's weights.

        Every rank passes the same full model; each keeps the slices of the
        projections its groups give it (embeddings, norms and the head stay whole).
        The result has this model's dtype and device; this model is not changed.

        Raises:
            ValueError: this model is already sharded (shard from the full weights).
        """
        full_layers = [_full_weights(i, layer) for i, layer in enumerate(self.layers)]  # refuses sharded layers first
        sharded = DecoderLM(self.config, groups, attention_mode=attention_mode)
        sharded.to(device=self.embed_tokens.weight.device, dtype=self.embed_tokens.weight.dtype)
        for layer, full in zip(sharded.layers, full_layers):
            # cast: DecoderLM builds its layers as DecoderLayers; nn.Sequential only types them as Module.
            _load_full_layer_(cast(DecoderLayer, layer), full)
        sharded.embed_tokens.weight.copy_(self.embed_tokens.weight)
        sharded.input_norm.weight.copy_(self.input_norm.weight)
        if not self.config.tie_word_embeddings:  # tied: the head is the embedding copied above
            sharded.lm_head.weight.copy_(self.lm_head.weight)
        return sharded

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for full, unpadded sequences ``[batch, seq]`` (no cache kept)."""
        batch, length = input_ids.shape
        rows = StepRows(tuple(range(batch)), (length,) * batch, (0,) * batch)
        hidden, residual = self.embed(input_ids.reshape(-1))
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rows=rows, cache=KVCache())
        return self.head(hidden).view(batch, length, -1)

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, os.PathLike],
        *,
        groups: Optional[BlockGroups] = None,
        attention_mode: str = "context",
        dtype: torch.dtype = torch.float32,
    ) -> "DecoderLM":
        """Loads a local Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``).

        Each rank loads its tensor-parallel shard of every projection from the full weights.
        ``groups`` and ``attention_mode`` are as in :class:`DecoderLM`.

        Raises:
            FileNotFoundError: the directory lacks ``config.json`` or safetensors files.
            ValueError: the config uses features this decoder lacks, or tensors are missing/unexpected.
        """
        from safetensors.torch import load_file

        path = os.fspath(path)
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face model directory.")
        with open(config_file) as f:
            config = DecoderConfig.from_hf(json.load(f))
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} has no *.safetensors files (PyTorch .bin checkpoints are not read).")
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(os.path.join(path, name)))
        model = cls(config, groups, attention_mode=attention_mode)
        model._load_hf_state(state)
        return model.to(dtype)

    @torch.no_grad()
    def _load_hf_state(self, state: dict[str, torch.Tensor]) -> None:
        state = {k.removeprefix("model."): v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise ValueError(
                    f"the checkpoint has no tensor {name!r}, which a {self.config.model_type} model with this "
                    "config.json has: is config.json the one saved with these weights?"
                )
            used.add(name)
            return state[name]

        config, num_layers = self.config, self.config.num_layers
        self.embed_tokens.weight.copy_(take("embed_tokens.weight"))
        self.input_norm.weight.copy_(take("layers.0.input_layernorm.weight"))
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            # The fused layout: this layer ends with the next layer's input norm (the final norm last).
            nxt = f"layers.{i + 1}.input_layernorm.weight" if i + 1 < num_layers else "norm.weight"
            full = {f"attn.{n}": take(p + f"self_attn.{n}.weight") for n in _ATTN_PROJECTIONS}
            if config.qkv_bias:
                full.update({f"attn.{n}.bias": take(p + f"self_attn.{n}.bias") for n in _ATTN_PROJECTIONS[:3]})
            if config.o_bias:
                full["attn.o_bias"] = take(p + "self_attn.o_proj.bias")
            if config.qk_norm:
                full.update({f"attn.{n}": take(p + f"self_attn.{n}.weight") for n in ("q_norm", "k_norm")})
            full.update({f"mlp.{n}": take(p + f"mlp.{n}.weight") for n in _MLP_PROJECTIONS})
            full["post_attention_norm"] = take(p + "post_attention_layernorm.weight")
            full["output_norm"] = take(nxt)
            _load_full_layer_(cast(DecoderLayer, layer), full)  # built as a DecoderLayer in __init__
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        else:
            self.lm_head.weight.copy_(take("lm_head.weight"))
        unexpected = sorted(set(state) - used)
        if unexpected:
            raise ValueError(f"the checkpoint has tensors DecoderLM does not use: {unexpected[:5]}")


_ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def _load_full_layer_(layer: DecoderLayer, full: dict[str, torch.Tensor]) -> None:
    """Copies this rank's shards of one layer's full weights (keys ``attn.q_proj``, ..., ``output_norm``).

    Optional keys, present exactly when the layer has the parameter: ``attn.q_proj.bias``
    (and k, v), ``attn.o_bias``, ``attn.q_norm``, ``attn.k_norm``.
    """
    attn = layer.attn
    for name in _ATTN_PROJECTIONS:
        getattr(attn, name).load_full_weight_(full[f"attn.{name}"], *_optional(full, f"attn.{name}.bias"))
    for name in ("o_bias", "q_norm", "k_norm"):
        target = getattr(attn, name)
        if target is not None:
            (target if name == "o_bias" else target.weight).copy_(full[f"attn.{name}"])
    for name in _MLP_PROJECTIONS:
        getattr(layer.mlp, name).load_full_weight_(full[f"mlp.{name}"])
    layer.post_attention_norm.weight.copy_(full["post_attention_norm"])
    layer.output_norm.weight.copy_(full["output_norm"])


def _full_weights(index: int, layer: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of an unsharded decoder layer, keyed as :func:`_load_full_layer_` reads them."""
    groups = getattr(layer, "groups", None)
    if not isinstance(layer, DecoderLayer) or groups is None or max(groups.attn_tp.size, groups.cp.size) > 1:
        raise ValueError(
            f"layer {index} is {'already sharded' if isinstance(layer, DecoderLayer) else type(layer).__name__}: "
            "sharding takes the unsharded DecoderLayers of a model built (or loaded) without groups."
        )
    attn = layer.attn
    full = {f"attn.{n}": getattr(attn, n).weight for n in _ATTN_PROJECTIONS}
    biases = {f"attn.{n}.bias": getattr(attn, n).bias for n in _ATTN_PROJECTIONS[:3]}
    full.update({k: b for k, b in biases.items() if b is not None})
    if attn.o_bias is not None:
        full["attn.o_bias"] = attn.o_bias
    full.update({f"attn.{n}": getattr(attn, n).weight for n in ("q_norm", "k_norm") if getattr(attn, n) is not None})
    full.update({f"mlp.{n}": getattr(layer.mlp, n).weight for n in _MLP_PROJECTIONS})
    full["post_attention_norm"] = layer.post_attention_norm.weight
    full["output_norm"] = layer.output_norm.weight
    return full


def _optional(full: dict[str, torch.Tensor], key: str) -> tuple[torch.Tensor, ...]:
    return (full[key],) if key in full else ()


@torch.no_grad()
def shard_layers(
    layers: Sequence[nn.Module], config: DecoderConfig, groups: BlockGroups, *, attention_mode: str = "context"
) -> nn.Sequential:
    """New decoder layers holding this rank's shards of unsharded ``layers``.

    Every rank of the groups calls it with the same full layers and keeps its
    slices (:meth:`ColumnParallelLinear.load_full_weight_` and its row-parallel
    twin pick them). The new layers take the old ones' dtype and device.

    Args:
        layers: unsharded :class:`DecoderLayer` s (built with no groups).
        config: their model sizes.
        groups: the groups to shard over.
        attention_mode: ``"data"`` for data-parallel attention over a cp group of
            several ranks.

    Raises:
        ValueError: a layer is not a :class:`DecoderLayer`, or is already sharded.
    """
    rotary = RotaryEmbedding(config.attn_head_dim, config.rope_theta)
    full_layers = [_full_weights(i, layer) for i, layer in enumerate(layers)]
    sharded = []
    for i, full in enumerate(full_layers):
        weight = full["attn.q_proj"]
        layer = DecoderLayer(config, groups, rotary, attention_mode=attention_mode, window=config.window_of(i))
        _load_full_layer_(layer.to(device=weight.device, dtype=weight.dtype), full)
        sharded.append(layer)
    return nn.Sequential(*sharded)
