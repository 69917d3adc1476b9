"""Huawei Ascend NPUs, through Huawei's torch plugin (the ``npu`` extra)."""

from __future__ import annotations

from lightning_pp.integration.accelerators.base import DeviceAccelerator

__all__ = ["NPUAccelerator"]


class NPUAccelerator(DeviceAccelerator):
    """Runs on Ascend NPUs (``accelerator="npu"``); collectives use HCCL.

    The vendor plugin is imported by the platform layer only when this accelerator
    is asked about, so a machine without it pays nothing.
    """

    device_type = "npu"

    @staticmethod
    def name() -> str:
        return "npu"
