"""Fake device modules, so code paths for devices this machine lacks run on the CPU.

A fake records what was asked of it; tests assert on those calls. The fakes live
in the test suite only: the package never ships them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

__all__ = ["FakeDeviceModule", "FakeEvent", "FakeStream", "install_fake_npu"]


class FakeEvent:
    def __init__(self, module: "FakeDeviceModule", enable_timing: bool = False) -> None:
        self.module = module
        self.recorded_on: Optional[FakeStream] = None

    def record(self, stream: Any = None) -> None:
        self.recorded_on = stream
        self.module.calls.append(("event.record", stream))

    def synchronize(self) -> None:
        self.module.calls.append(("event.synchronize",))

    def query(self) -> bool:
        return True


class FakeStream:
    def __init__(self, module: "FakeDeviceModule", device: Any = None, priority: int = 0) -> None:
        self.module = module
        self.device = device
        self.priority = priority

    def wait_event(self, event: FakeEvent) -> None:
        self.module.calls.append(("stream.wait_event", self, event))

    def wait_stream(self, stream: "FakeStream") -> None:
        self.module.calls.append(("stream.wait_stream", self, stream))


class FakeDeviceModule:
    """Looks like ``torch.xpu``/``torch.npu`` to the platform layer."""

    def __init__(self, device_type: str = "xpu", count: int = 2) -> None:
        self.device_type = device_type
        self.count = count
        self.calls: list[tuple] = []
        self.default_stream = FakeStream(self)
        self.active_streams: list[FakeStream] = []

    def is_available(self) -> bool:
        return True

    def _is_compiled(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def set_device(self, index: int) -> None:
        self.calls.append(("set_device", index))

    def current_device(self) -> int:
        return 0

    def synchronize(self, device: Any = None) -> None:
        self.calls.append(("synchronize", device))

    def Stream(self, device: Any = None, priority: int = 0) -> FakeStream:  # noqa: N802 - mirrors torch
        return FakeStream(self, device, priority)

    def Event(self, enable_timing: bool = False) -> FakeEvent:  # noqa: N802 - mirrors torch
        return FakeEvent(self, enable_timing)

    def current_stream(self, device: Any = None) -> FakeStream:
        return self.active_streams[-1] if self.active_streams else self.default_stream

    @contextlib.contextmanager
    def stream(self, stream: FakeStream):
        self.calls.append(("stream.enter", stream))
        self.active_streams.append(stream)
        try:
            yield stream
        finally:
            self.active_streams.pop()

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        return {"allocated_bytes.all.current": 1234}

    def max_memory_allocated(self, device: Any = None) -> int:
        return 4321


def install_fake_npu(count: int = 2) -> FakeDeviceModule:
    """Makes ``torch.device("npu")`` and ``torch.get_device_module("npu")`` work, as torch_npu would.

    This renames torch's PrivateUse1 device for the rest of the process: call it
    only in a spawned subprocess.
    """
    module = FakeDeviceModule("npu", count)
    torch.utils.rename_privateuse1_backend("npu")
    torch._register_device_module("npu", module)
    return module
