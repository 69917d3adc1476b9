"""Lightning glue: the only subpackage that imports ``lightning``.

``PPStrategy`` and its hooks, the xpu/npu accelerators and device-correct DDP, the
registration that teaches Lightning all of them (run on import), prediction writers
and the generation LightningModule.
"""

from lightning_pp.integration.accelerators import (
    DeviceAccelerator,
    NPUAccelerator,
    XPUAccelerator,
)
from lightning_pp.integration.device_ddp import (
    DeviceDDPStrategy,
    FabricDeviceDDPStrategy,
)
from lightning_pp.integration.generation_module import (
    GenerationModule,
    PromptDataset,
    PromptItem,
    ScoreDataset,
    collate_prompts,
)
from lightning_pp.integration.generation_progress import GenerationProgress
from lightning_pp.integration.registration import register
from lightning_pp.integration.strategy import PPStrategy
from lightning_pp.integration.writer import StreamingPredictionWriter, read_predictions

__all__ = [
    "DeviceAccelerator",
    "DeviceDDPStrategy",
    "FabricDeviceDDPStrategy",
    "GenerationModule",
    "GenerationProgress",
    "NPUAccelerator",
    "PPStrategy",
    "PromptDataset",
    "PromptItem",
    "ScoreDataset",
    "StreamingPredictionWriter",
    "XPUAccelerator",
    "collate_prompts",
    "read_predictions",
    "register",
]

register()
