"""Sizes of a Llama-family decoder, and how each Hugging Face family's ``config.json`` maps to them.

Llama, Mistral, Qwen2 and Qwen3 are one architecture with a few switches, which
:class:`DecoderConfig` names instead of subclassing the model per family:

==========  ======================  ==============  ===========  ================================
family      q/k/v bias              o_proj bias     q/k norm     sliding window
==========  ======================  ==============  ===========  ================================
llama       ``attention_bias``      same            no           no
mistral     no                      no              no           ``sliding_window``, every layer
qwen2       yes                     no              no           layers ``>= max_window_layers``
                                                                 when ``use_sliding_window``
qwen3       ``attention_bias``      same            per head     as qwen2
==========  ======================  ==============  ===========  ================================

A checkpoint's ``layer_types`` (``"full_attention"`` / ``"sliding_attention"``),
when present, says which layers slide. Everything else a config may ask for that
the decoder does not implement (an MLP bias, another activation, scaled rotary
embeddings) is refused by name rather than loaded into a model that would give
other logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from lightning_pp.models.tp_block import BlockConfig

__all__ = ["ARCHITECTURES", "DecoderConfig", "FAMILIES"]

#: ``model_type`` values :meth:`DecoderConfig.from_hf` reads.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
#: The ``architectures`` entry of each family's causal-LM checkpoint.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes and switches of a Llama-family decoder (the subset of a Hugging Face config used here).

    Attributes:
        head_dim: width of one attention head; ``None``: ``hidden_size / num_heads``.
        qkv_bias: the q/k/v projections have a bias (Qwen2; ``attention_bias``).
        o_bias: the output projection has a bias (``attention_bias`` of Llama and Qwen3).
        qk_norm: an RMSNorm over each query and key head before the rotary embedding (Qwen3).
        layer_windows: per layer, how many most recent positions a query reads
            (itself included), ``None`` for all of them; ``()``: no layer slides.
        max_position_embeddings: the most positions the model was trained for
            (``None``: not known, not checked).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    max_position_embeddings: Optional[int] = None
    head_dim: Optional[int] = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    layer_windows: tuple[Optional[int], ...] = ()
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}.")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}.")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}: give head_dim."
            )
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers.")
        if any(w is not None and w < 1 for w in self.layer_windows):
            raise ValueError(f"sliding windows must be at least 1 position, got {self.layer_windows}.")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def attn_head_dim(self) -> int:
        """The width of one attention head."""
        return self.head_dim or self.hidden_size // self.num_heads

    def window_of(self, layer: int) -> Optional[int]:
        """Layer ``layer``'s sliding window (``None``: it attends to every earlier position)."""
        return self.layer_windows[layer] if self.layer_windows else None

    def block_config(self, attention_mode: str = "context") -> BlockConfig:
        """The MLP's sizes, as the tensor-parallel block lays them out."""
        return BlockConfig(
            hidden_size=self.hidden_size,
            num_heads=1,  # the attention is DecoderLM's own (head_dim may differ from hidden / heads)
            ffn_hidden_size=self.intermediate_size,
            eps=self.rms_norm_eps,
            attention_mode=attention_mode,
        )

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "DecoderConfig":
        """Reads a Hugging Face ``config.json`` dict of a supported family; refuses what is not implemented.

        Raises:
            ValueError: another architecture (the message lists the supported ones), or
                a feature of a supported one that the decoder lacks.
        """
        family = _family(hf)
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        num_layers = int(hf["num_hidden_layers"])
        attention_bias = bool(hf.get("attention_bias", False))
        unsupported = {
            "mlp_bias": bool(hf.get("mlp_bias", False)),
            f"hidden_act {hf.get('hidden_act')!r} (only silu)": hf.get("hidden_act", "silu") != "silu",
            "attention_bias (Mistral and Qwen2 have none)": attention_bias and family in ("mistral", "qwen2"),
        }
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        unsupported[f"rope type {rope_type!r}"] = rope_type != "default"
        found = [name for name, present in unsupported.items() if present]
        if found:
            raise ValueError(
                f"config.json ({family}) uses {', '.join(found)}, which DecoderLM does not implement; "
                "it would give other logits than the original model."
            )
        eos = hf.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            max_position_embeddings=int(hf["max_position_embeddings"]) if hf.get("max_position_embeddings") else None,
            head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
            qkv_bias=attention_bias or family == "qwen2",
            o_bias=attention_bias,
            qk_norm=family == "qwen3",
            layer_windows=_layer_windows(hf, family, num_layers),
            model_type=family,
        )


def _family(hf: dict[str, Any]) -> str:
    """The family of a config, from ``model_type`` and ``architectures``; refuses others, naming the supported."""
    model_type = hf.get("model_type", "llama")
    architectures = list(hf.get("architectures") or [])
    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if model_type not in FAMILIES or unknown:
        got = f"model_type {model_type!r}" + (f" and architectures {architectures}" if architectures else "")
        raise ValueError(
            f"config.json has {got}; DecoderLM loads the model types {', '.join(FAMILIES)} "
            f"(architectures {', '.join(ARCHITECTURES)})."
        )
    return str(model_type)


def _layer_windows(hf: dict[str, Any], family: str, num_layers: int) -> tuple[Optional[int], ...]:
    """Each layer's sliding window, as the family's Hugging Face model applies it."""
    window = hf.get("sliding_window")
    if family == "llama" or not window or (family != "mistral" and not hf.get("use_sliding_window", False)):
        return ()
    layer_types = hf.get("layer_types")
    if layer_types:
        if len(layer_types) != num_layers or not set(layer_types) <= {"full_attention", "sliding_attention"}:
            raise ValueError(
                f"config.json has layer_types {layer_types}; DecoderLM reads one 'full_attention' or "
                f"'sliding_attention' per layer ({num_layers} layers)."
            )
        windows = [int(window) if t == "sliding_attention" else None for t in layer_types]
    elif family == "mistral":
        windows = [int(window)] * num_layers
    else:  # Qwen2/3 without layer_types: the layers from max_window_layers on slide
        first = int(hf.get("max_window_layers", num_layers))
        windows = [int(window) if i >= first else None for i in range(num_layers)]
    return tuple(windows) if any(w is not None for w in windows) else ()
