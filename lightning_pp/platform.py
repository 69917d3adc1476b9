"""The one place that knows about devices.

Every device fact lightning_pp needs lives here: which device type this process
runs on, its ``torch`` device module, streams and events, the distributed
backend, and what the hardware can do. Nothing else in the package may name
``torch.cuda``, ``torch.xpu``, ``torch_npu`` or a backend string (a test
enforces this); it asks :func:`current_platform` instead.

Why a module-level singleton and not an attribute set during start-up: SGLang's
XPU pipeline code read ``self.device_module`` from a method that ran before the
attribute was assigned; the ``AttributeError`` was swallowed and the latency
predictor silently stayed off. Here the platform is resolved when this module is
imported, so no caller can observe it half-initialised.

Tests (and users on unusual machines) override it with
``LIGHTNING_PP_DEVICE=<type>`` or with :func:`use_platform`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import resource
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist

__all__ = [
    "DEVICE_ENV_VAR",
    "CPUEvent",
    "Platform",
    "current_platform",
    "detect_device_type",
    "distributed_backend_for",
    "import_npu_support",
    "make_platform",
    "platform_for",
    "use_platform",
]

DEVICE_ENV_VAR = "LIGHTNING_PP_DEVICE"

# NOTE: Intel's XCCL busy-polls inside ``isend`` until the peer posts the matching
# receive (SGLang PR 23645). NCCL's send kernel likewise waits on the device for
# its receiver. gloo does too: measured with torch 2.13, a 64-byte and a 4 MiB
# ``isend`` alike complete only once the receiver posts its receive (the send
# ``wait()`` took 0.50 s against a receiver that slept 0.5 s). No device is known
# whose sends are buffered, so every platform says sends wait.
_SEND_DOES_NOT_WAIT: frozenset = frozenset()

# NOTE: XCCL's ``isend`` busy-polls on the host until the receive is posted, so even a
# send that is not waited for blocks its sender: there, sends must keep the proven order.
_POSTING_A_SEND_BLOCKS = frozenset({"xpu"})

# Devices whose collective backends (NCCL, XCCL, HCCL) make ``work.wait()`` a wait of
# the current stream, not of the host: the host may queue more work behind a transfer.
_STREAM_ORDERED_DEVICES = frozenset({"cuda", "xpu", "npu"})

# Devices with page-locked host memory and truly asynchronous host-to-device copies.
_ASYNC_COPY_DEVICES = frozenset({"cuda", "xpu", "npu"})


def import_npu_support() -> Optional[ModuleType]:
    """Imports ``torch_npu`` if it is installed and returns it, else ``None``.

    Importing it is what registers ``torch.npu``, the ``"npu"`` device name and the
    ``hccl`` distributed backend, so it must happen before any of those are used.
    """
    if importlib.util.find_spec("torch_npu") is None:
        return None
    return importlib.import_module("torch_npu")


def _device_module_or_none(device_type: str) -> Optional[Any]:
    if device_type == "npu":
        import_npu_support()
    try:
        return torch.get_device_module(device_type)
    except (RuntimeError, AttributeError):
        return None


def _device_is_available(device_type: str) -> bool:
    module = _device_module_or_none(device_type)
    if module is None or not hasattr(module, "is_available"):
        return False
    try:
        return bool(module.is_available())
    except RuntimeError:
        return False


def detect_device_type() -> str:
    """Returns the device type this process should use.

    ``LIGHTNING_PP_DEVICE`` wins when set. Otherwise the first available of
    cuda, xpu, npu, mps, falling back to cpu.
    """
    forced = os.environ.get(DEVICE_ENV_VAR, "").strip().lower()
    if forced:
        return forced
    for device_type in ("cuda", "xpu", "npu", "mps"):
        if _device_is_available(device_type):
            return device_type
    return "cpu"


def distributed_backend_for(device_type: str) -> str:
    """Returns torch's default ``torch.distributed`` backend for ``device_type``.

    Reads torch's own device-to-backend map (cpu→gloo, cuda→nccl, xpu→xccl;
    torch_npu adds npu→hccl when imported), so a backend registered by a vendor
    plugin is picked up without a table here. Unknown devices get gloo.
    """
    if device_type == "npu":
        import_npu_support()
    return dist.Backend.default_device_backend_map.get(device_type, "gloo")


class CPUEvent:
    """An event for the CPU, which has no device queue to mark.

    ``torch.cpu.Event`` exists but cannot measure elapsed time, which tracing
    needs. CPU work is synchronous, so recording an event is taking a timestamp,
    and waiting on one returns at once.
    """

    def __init__(self, enable_timing: bool = False, **_: Any) -> None:
        self._time: Optional[float] = None

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, end_event: "CPUEvent") -> float:
        """Milliseconds between this event and ``end_event``, like the device events."""
        if self._time is None or end_event._time is None:
            raise RuntimeError("Both events must be recorded before elapsed_time() is called.")
        return (end_event._time - self._time) * 1000.0


@dataclass(frozen=True)
class Platform:
    """Device facts for one device type, with the few operations built on them.

    Attributes:
        device_type: ``"cuda"``, ``"xpu"``, ``"npu"``, ``"mps"``, ``"cpu"`` or another name.
        device_module: the ``torch`` device module (``torch.get_device_module``), or a
            fake in tests.
        dist_backend: the ``torch.distributed`` backend for this device.
        send_waits_for_receiver: a point-to-point send does not complete until the peer
            posts its receive. Schedules must then never let two ranks both send first
            to each other.
        supports_async_copy: pinned host memory and ``non_blocking`` host-to-device
            copies are meaningful (overlap compute) on this device.
        has_fused_allreduce: FlashInfer's allreduce-fusion kernels can be used (CUDA with
            ``flashinfer-python`` installed).
    """

    device_type: str
    device_module: Any = field(repr=False)
    dist_backend: str
    send_waits_for_receiver: bool
    supports_async_copy: bool
    has_fused_allreduce: bool

    # -- devices -------------------------------------------------------------------------
    def device(self, local_rank: Optional[int] = None) -> torch.device:
        """The ``torch.device`` for a local rank (index-less on CPU)."""
        if self.device_type == "cpu" or local_rank is None:
            return torch.device(self.device_type)
        return torch.device(self.device_type, local_rank)

    def is_available(self) -> bool:
        if self.device_type == "cpu":
            return True
        is_available = getattr(self.device_module, "is_available", None)
        return bool(is_available()) if is_available is not None else False

    def why_unavailable(self) -> Optional[str]:
        """Says what is missing for this device, or ``None`` when it is available."""
        if self.is_available():
            return None
        if self.device_type == "npu" and importlib.util.find_spec("torch_npu") is None:
            return (
                "torch_npu is not installed. Install the torch_npu release that matches your torch "
                "version (`pip install 'lightning_pp[npu]'`) on a machine with Ascend CANN."
            )
        if self.device_module is None:
            return f"this torch build ({torch.__version__}) has no {self.device_type!r} device module."
        compiled = getattr(self.device_module, "_is_compiled", None)
        if compiled is not None and not compiled():
            return (
                f"this torch build ({torch.__version__}) was compiled without {self.device_type.upper()} "
                f"support. Install a torch wheel built for {self.device_type.upper()}."
            )
        return (
            f"torch has {self.device_type.upper()} support but found no device "
            f"(torch.{self.device_type}.is_available() is False). Check the driver and that the "
            "device is visible to this process."
        )

    def device_count(self) -> int:
        if self.device_type == "cpu":
            return 1
        return int(self.device_module.device_count()) if self.is_available() else 0

    def set_device(self, device: Union[torch.device, int]) -> None:
        """Makes ``device`` current for this process (a no-op on CPU)."""
        if self.device_type == "cpu":
            return
        index = device.index if isinstance(device, torch.device) else device
        if index is not None:
            self.device_module.set_device(index)

    def synchronize(self, device: Optional[torch.device] = None) -> None:
        if self.device_type == "cpu":
            return
        self.device_module.synchronize(device)

    def memory_stats(self, device: Optional[torch.device] = None) -> dict[str, Any]:
        """Memory counters for ``device``; on CPU the process's peak resident size."""
        if self.device_type == "cpu":
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return {"peak_rss_bytes": peak_kib * 1024}
        stats = getattr(self.device_module, "memory_stats", None)
        return dict(stats(device)) if stats is not None else {}

    def max_memory_allocated(self, device: Optional[torch.device] = None) -> int:
        if self.device_type == "cpu":
            return int(self.memory_stats()["peak_rss_bytes"])
        return int(self.device_module.max_memory_allocated(device))

    # -- streams and events ----------------------------------------------------------
    def stream(self, device: Optional[torch.device] = None, priority: int = 0) -> Any:
        """A new stream on ``device`` (``torch.cpu.Stream`` stand-in on CPU)."""
        if self.device_type == "cpu":
            return torch.cpu.Stream()
        if device is None:
            return self.device_module.Stream(priority=priority)
        return self.device_module.Stream(device=device, priority=priority)

    def current_stream(self, device: Optional[torch.device] = None) -> Any:
        if self.device_type == "cpu":
            return torch.cpu.current_stream()
        return self.device_module.current_stream(device)

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager:
        """Context manager that makes ``stream`` current (does nothing on CPU)."""
        if self.device_type == "cpu" or stream is None:
            return contextlib.nullcontext()
        return self.device_module.stream(stream)

    def event(self, enable_timing: bool = False) -> Any:
        """A new event; :class:`CPUEvent` on CPU."""
        if self.device_type == "cpu":
            return CPUEvent(enable_timing=enable_timing)
        return self.device_module.Event(enable_timing=enable_timing)

    def record(self, event: Any, stream: Any = None) -> Any:
        """Records ``event`` on ``stream`` (the current stream by default) and returns it."""
        event.record(stream if stream is not None else self.current_stream())
        return event

    def posting_a_send_blocks(self, backend: str) -> bool:
        """Whether ``isend`` itself blocks the host until the receiver is there (XCCL), not only its ``wait()``."""
        return self.device_type in _POSTING_A_SEND_BLOCKS and backend != "gloo"

    def transfers_wait_on_stream(self, backend: str) -> bool:
        """Whether a transfer's ``work.wait()`` on ``backend`` makes the current stream wait instead of the host.

        True for the device backends (NCCL and its twins) on their devices; gloo's
        waits block the host, which on the CPU is where the work is anyway.
        """
        return self.device_type in _STREAM_ORDERED_DEVICES and backend != "gloo"

    def wait_event(self, event: Any, stream: Any = None) -> None:
        """Makes ``stream`` (the current one by default) wait for ``event``."""
        if self.device_type == "cpu":
            return
        (stream if stream is not None else self.current_stream()).wait_event(event)

    # -- host/device copies -------------------------------------------------------------
    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """Page-locks a host tensor when the device benefits from it."""
        if not self.supports_async_copy or tensor.device.type != "cpu" or tensor.is_pinned():
            return tensor
        return tensor.pin_memory()

    def to_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Copies ``tensor`` to ``device``, asynchronously from pinned memory where supported."""
        non_blocking = self.supports_async_copy and tensor.device.type == "cpu" and tensor.is_pinned()
        return tensor.to(device, non_blocking=non_blocking)

    # -- precision --------------------------------------------------------------------------
    @property
    def autocast_device_type(self) -> str:
        """The ``device_type`` argument for ``torch.autocast`` and ``torch.amp.GradScaler``."""
        return self.device_type


def make_platform(device_type: str, device_module: Any = None, dist_backend: Optional[str] = None) -> Platform:
    """Builds the :class:`Platform` for ``device_type``.

    Args:
        device_type: a device name such as ``"xpu"``.
        device_module: the device module to use; by default ``torch.get_device_module``.
            Tests pass a fake here to exercise paths for devices this machine lacks.
        dist_backend: the distributed backend; by default torch's map for the device.
    """
    device_type = device_type.lower()
    if device_module is None:
        device_module = _device_module_or_none(device_type)
    has_flashinfer = device_type == "cuda" and importlib.util.find_spec("flashinfer") is not None
    return Platform(
        device_type=device_type,
        device_module=device_module,
        dist_backend=dist_backend or distributed_backend_for(device_type),
        send_waits_for_receiver=device_type not in _SEND_DOES_NOT_WAIT,
        supports_async_copy=device_type in _ASYNC_COPY_DEVICES,
        has_fused_allreduce=has_flashinfer,
    )


# Resolved once, at import time, so nothing depends on initialisation order.
_CURRENT: Platform = make_platform(detect_device_type())


def current_platform() -> Platform:
    """The platform of this process."""
    return _CURRENT


def platform_for(device: Union[torch.device, str]) -> Platform:
    """The platform for ``device``'s type: the process platform when it matches, else a new one.

    Lightning glue that is handed a device (an accelerator, a DDP strategy) asks here,
    so a fake installed with :func:`use_platform` reaches it too.
    """
    device_type = device.type if isinstance(device, torch.device) else device.split(":")[0]
    return _CURRENT if _CURRENT.device_type == device_type else make_platform(device_type)


@contextlib.contextmanager
def use_platform(platform: Union[Platform, str]) -> Iterator[Platform]:
    """Temporarily replaces the process platform (for tests and tools).

    Args:
        platform: a :class:`Platform`, or a device type to build one for.
    """
    global _CURRENT
    previous = _CURRENT
    _CURRENT = make_platform(platform) if isinstance(platform, str) else platform
    try:
        yield _CURRENT
    finally:
        _CURRENT = previous
