"""Pipeline parallelism for PyTorch Lightning on any accelerator.

The package is layered; each layer imports only the layers before it:

1. ``platform`` -- device facts (device module, streams, events, backend).
2. ``tree``, ``pipeline`` -- pure logic: nested structures, schedules as data,
   microbatches, stage splits, the schedule executor and streaming engine.
3. ``distributed`` -- where tensors cross ranks: topology, point-to-point, collectives.
4. ``parallel``, ``tracing``, ``checkpoint`` -- tensor/context/attention-parallel
   layers and gradients; trace files and timelines; sharded checkpoints.
5. ``generation`` then ``models`` -- KV-cached generation; reference models.
6. ``integration`` -- the Lightning glue, the only code that imports ``lightning``.

``import lightning_pp`` teaches Lightning the ``"xpu"`` and ``"npu"`` accelerators
and the ``"pp"`` strategy (Trainer and Fabric) without importing Lightning itself:
it registers at once when Lightning is already imported, and otherwise the moment
Lightning is. So ``import lightning_pp.distributed.topology`` from plain torch costs
no Lightning import and patches nothing. The public names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_pp._deferred import register_with_lightning

if TYPE_CHECKING:
    from lightning_pp.checkpoint import consolidate_checkpoint
    from lightning_pp.distributed.errors import CollectiveError, PipeCommError
    from lightning_pp.integration import GenerationProgress, NPUAccelerator, PPStrategy, XPUAccelerator
    from lightning_pp.platform import Platform, current_platform, use_platform

__version__ = "0.1.0.dev0"

__all__ = [
    "CollectiveError",
    "GenerationProgress",
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

# Where each public name lives; loaded on first access (PEP 562).
_HOMES = {
    "CollectiveError": "lightning_pp.distributed.errors",
    "GenerationProgress": "lightning_pp.integration",
    "NPUAccelerator": "lightning_pp.integration",
    "PPStrategy": "lightning_pp.integration",
    "PipeCommError": "lightning_pp.distributed.errors",
    "Platform": "lightning_pp.platform",
    "XPUAccelerator": "lightning_pp.integration",
    "consolidate_checkpoint": "lightning_pp.checkpoint",
    "current_platform": "lightning_pp.platform",
    "use_platform": "lightning_pp.platform",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'lightning_pp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


register_with_lightning()
