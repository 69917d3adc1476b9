"""DDP for devices Lightning does not know (xpu, npu): streams and backend from the platform layer."""

from __future__ import annotations

from typing import Any

from lightning.fabric.strategies import DDPStrategy as FabricDDPStrategy
from lightning.pytorch.strategies import DDPStrategy
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_pp.platform import platform_for

__all__ = ["DeviceDDPStrategy", "FabricDeviceDDPStrategy"]


def _wrap_ddp(module: Module, root_device: Any, device_ids: Any, ddp_kwargs: dict) -> DistributedDataParallel:
    # NOTE: Lightning 2.6.6 builds DDP inside a CUDA stream context for every
    # non-CPU device, which crashes on XPU/NPU. Use the device's own side stream, so
    # DDP's initial parameter broadcast does not serialise with the default stream.
    platform = platform_for(root_device)
    side_stream = platform.stream(root_device) if device_ids is not None else None
    with platform.use_stream(side_stream):
        return DistributedDataParallel(module=module, device_ids=device_ids, **ddp_kwargs)


class DeviceDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with the stream and backend taken from the platform layer.

    Chosen automatically for ``Trainer(accelerator="xpu"|"npu", devices=N>1)``. Besides
    the stream, Lightning's backend table lacks ``npu``: here the backend is the
    platform's (``xccl``, ``hccl``, ...).
    """

    @override
    def _setup_model(self, model: Module) -> DistributedDataParallel:
        return _wrap_ddp(model, self.root_device, self.determine_ddp_device_ids(), self._ddp_kwargs)

    @override
    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or platform_for(self.root_device).dist_backend


class FabricDeviceDDPStrategy(FabricDDPStrategy):
    """The Fabric twin of :class:`DeviceDDPStrategy`."""

    @override
    def setup_module(self, module: Module) -> DistributedDataParallel:
        return _wrap_ddp(module, self.root_device, self._determine_ddp_device_ids(), self._ddp_kwargs)

    @override
    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or platform_for(self.root_device).dist_backend
