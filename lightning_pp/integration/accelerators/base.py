"""What the XPU and NPU accelerators share: Lightning's Accelerator contract on top of the platform layer."""

from __future__ import annotations

from typing import Any, ClassVar, Union

import torch
from lightning.pytorch.accelerators.accelerator import Accelerator
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_pp.platform import Platform, platform_for

__all__ = ["DeviceAccelerator", "parse_device_indices"]


def parse_device_indices(devices: Any, device_count: int, name: str) -> list[int]:
    """Turns Lightning's ``devices`` flag into device indices, checked against what exists.

    Accepts an int (how many; ``-1`` for all), a string (``"2"``, ``"-1"``, ``"0,2"``,
    ``"auto"``) or a list of indices.
    """
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            devices = -1
        elif "," in text or (text.startswith("[") and text.endswith("]")):
            devices = [int(part) for part in text.strip("[]").split(",") if part.strip()]
        else:
            devices = int(text)
    if isinstance(devices, int):
        if devices == -1:
            devices = device_count
        if devices <= 0:
            raise MisconfigurationException(
                f"`devices={devices}` asks for no {name} device. Pass a positive count, -1 for all, or a list "
                "of indices."
            )
        indices = list(range(devices))
    else:
        indices = [int(i) for i in devices]
    if not indices or len(set(indices)) != len(indices):
        raise MisconfigurationException(f"`devices={devices}` must list distinct {name} device indices.")
    missing = [i for i in indices if not 0 <= i < device_count]
    if missing:
        raise MisconfigurationException(
            f"{name} device(s) {missing} requested but this machine has {device_count} {name} device(s)."
            f" Use indices below {device_count} or fewer devices."
        )
    return indices


class DeviceAccelerator(Accelerator):
    """An accelerator for one device type, answered entirely by :mod:`lightning_pp.platform`.

    Subclasses set ``device_type``. Creating one on a machine without the device
    fails at once with what is missing, rather than Lightning's generic "not
    available" message or, worse, a silent fall back to the CPU.
    """

    device_type: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        reason = self._platform().why_unavailable()
        if reason is not None:
            raise MisconfigurationException(
                f"`accelerator={self.device_type!r}` was requested but {self.device_type.upper()} is not usable "
                f"here: {reason}"
            )

    @classmethod
    def _platform(cls) -> Platform:
        return platform_for(cls.device_type)

    @override
    def setup_device(self, device: torch.device) -> None:
        if device.type != self.device_type:
            raise MisconfigurationException(
                f"{type(self).__name__} cannot set up device {device}: expected a {self.device_type!r} device."
            )
        self._platform().set_device(device)

    @override
    def teardown(self) -> None:
        return None

    @classmethod
    @override
    def parse_devices(cls, devices: Any) -> list[int]:
        return parse_device_indices(devices, cls.auto_device_count(), cls.device_type.upper())

    @classmethod
    @override
    def get_parallel_devices(cls, devices: Union[int, str, list[int]]) -> list[torch.device]:
        indices = devices if isinstance(devices, list) else cls.parse_devices(devices)
        platform = cls._platform()
        return [platform.device(i) for i in indices]

    @classmethod
    @override
    def auto_device_count(cls) -> int:
        return cls._platform().device_count()

    @classmethod
    @override
    def is_available(cls) -> bool:
        return cls._platform().is_available()

    @override
    def get_device_stats(self, device: Any) -> dict[str, Any]:
        return self._platform().memory_stats(torch.device(device) if not isinstance(device, torch.device) else device)
