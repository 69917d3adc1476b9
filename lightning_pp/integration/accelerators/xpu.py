"""Intel GPUs through stock torch (no intel-extension-for-pytorch needed)."""

from __future__ import annotations

from lightning_pp.integration.accelerators.base import DeviceAccelerator

__all__ = ["XPUAccelerator"]


class XPUAccelerator(DeviceAccelerator):
    """Runs on Intel GPUs (``accelerator="xpu"``); collectives use XCCL."""

    device_type = "xpu"

    @staticmethod
    def name() -> str:
        return "xpu"
