"""Pipeline parallelism for PyTorch Lightning on any accelerator.

Importing this package registers the ``"xpu"`` and ``"npu"`` accelerators (and the
``"pp"`` strategy) with Lightning's Trainer and Fabric.
"""

from lightning_pp.accelerators import NPUAccelerator, XPUAccelerator
from lightning_pp.checkpoint import consolidate_checkpoint
from lightning_pp.collective_errors import CollectiveError
from lightning_pp.p2p import PipeCommError
from lightning_pp.platform import Platform, current_platform, use_platform
from lightning_pp.registration import register as _register
from lightning_pp.strategy import PPStrategy

__version__ = "0.1.0.dev0"

__all__ = [
    "CollectiveError",
    "NPUAccelerator",
    "PPStrategy",
    "PipeCommError",
    "Platform",
    "XPUAccelerator",
    "__version__",
    "consolidate_checkpoint",
    "current_platform",
    "use_platform",
]

_register()
