"""Lightning accelerators for devices Lightning does not ship."""

from lightning_pp.integration.accelerators.base import DeviceAccelerator
from lightning_pp.integration.accelerators.npu import NPUAccelerator
from lightning_pp.integration.accelerators.xpu import XPUAccelerator

__all__ = ["DeviceAccelerator", "NPUAccelerator", "XPUAccelerator"]
