"""Pipeline parallelism for PyTorch Lightning on any accelerator.

The package is layered; each layer imports only the layers before it:

1. ``platform`` -- device facts (device module, streams, events, backend).
2. ``tree`` -- walking nested structures of tensors.
3. ``distributed`` -- where tensors cross ranks: topology, point-to-point, collectives.
4. ``pipeline`` and ``parallel`` -- schedules as data, microbatches, stage splits, the
   schedule executor and streaming engine; tensor/context/attention-parallel layers.
5. ``tracing`` and ``checkpoint`` -- trace files and timelines; sharded and
   Hugging Face checkpoints.
6. ``generation`` then ``models`` -- KV-cached generation; reference models.
7. ``integration`` -- the Lightning glue, the only code that imports ``lightning``.

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
    from lightning_pp.checkpoint import consolidate_checkpoint, load_hf_checkpoint
    from lightning_pp.distributed.errors import CollectiveError, PipeCommError
    from lightning_pp.integration import (
        GenerationModule,
        GenerationProgress,
        NPUAccelerator,
        PPStrategy,
        PromptDataset,
        ScoreDataset,
        StreamingPredictionWriter,
        XPUAccelerator,
        collate_prompts,
        read_predictions,
    )
    from lightning_pp.platform import Platform, current_platform, use_platform

__version__ = "0.1.0.dev0"

__all__ = [
    "CollectiveError",
    "GenerationModule",
    "GenerationProgress",
    "NPUAccelerator",
    "PPStrategy",
    "PipeCommError",
    "Platform",
    "PromptDataset",
    "ScoreDataset",
    "StreamingPredictionWriter",
    "XPUAccelerator",
    "__version__",
    "collate_prompts",
    "consolidate_checkpoint",
    "current_platform",
    "load_hf_checkpoint",
    "read_predictions",
    "use_platform",
]

# Where each public name lives; loaded on first access (PEP 562).
_HOMES = {
    "CollectiveError": "lightning_pp.distributed.errors",
    "GenerationModule": "lightning_pp.integration",
    "GenerationProgress": "lightning_pp.integration",
    "NPUAccelerator": "lightning_pp.integration",
    "PPStrategy": "lightning_pp.integration",
    "PipeCommError": "lightning_pp.distributed.errors",
    "Platform": "lightning_pp.platform",
    "PromptDataset": "lightning_pp.integration",
    "ScoreDataset": "lightning_pp.integration",
    "StreamingPredictionWriter": "lightning_pp.integration",
    "XPUAccelerator": "lightning_pp.integration",
    "collate_prompts": "lightning_pp.integration",
    "consolidate_checkpoint": "lightning_pp.checkpoint",
    "current_platform": "lightning_pp.platform",
    "load_hf_checkpoint": "lightning_pp.checkpoint",
    "read_predictions": "lightning_pp.integration",
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
