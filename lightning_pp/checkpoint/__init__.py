"""Sharded, atomic checkpoints under the one-device module's names.

Every rank writes its stage with torch.distributed.checkpoint; loading resumes at
any pipeline size, and ``consolidate_checkpoint`` makes a one-device file.
"""

from lightning_pp.checkpoint.sharded import consolidate_checkpoint, is_sharded_checkpoint

__all__ = ["consolidate_checkpoint", "is_sharded_checkpoint"]
