"""Reference models built from :mod:`lightning_pp.parallel_layers`."""

from lightning_pp.models.tp_block import BlockConfig, BlockGroups, ParallelAttention, SwiGLUMLP, TPTransformerBlock

__all__ = ["BlockConfig", "BlockGroups", "ParallelAttention", "SwiGLUMLP", "TPTransformerBlock"]
