"""Reference models built from the parallel layers, usable from plain torch.

``tp_block`` is a tensor/context-parallel transformer block; ``llama`` a Llama-style
decoder that loads Hugging Face checkpoints and generates with a KV cache.
"""

from lightning_pp.models.tp_block import BlockConfig, BlockGroups, ParallelAttention, SwiGLUMLP, TPTransformerBlock

__all__ = ["BlockConfig", "BlockGroups", "ParallelAttention", "SwiGLUMLP", "TPTransformerBlock"]
