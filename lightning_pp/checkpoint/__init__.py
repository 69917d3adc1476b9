"""Sharded, atomic checkpoints under the one-device module's names.

Every rank writes its stage with torch.distributed.checkpoint; loading resumes at
any pipeline size, and ``consolidate_checkpoint`` makes a one-device file.
``load_hf_checkpoint`` reads a local Hugging Face checkpoint directory, per stage.
"""

from lightning_pp.checkpoint.hf import load_hf_checkpoint
from lightning_pp.checkpoint.sharded import consolidate_checkpoint, is_sharded_checkpoint

__all__ = ["consolidate_checkpoint", "is_sharded_checkpoint", "load_hf_checkpoint"]
