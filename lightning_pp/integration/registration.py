"""Teach Lightning about lightning_pp: registries, and device-correct defaults for xpu/npu.

Lightning 2.6 dropped the entry-point hook through which external packages used to
register accelerators and strategies, so ``import lightning_pp`` calls
:func:`register` to add them to both the ``lightning.pytorch`` and the
``lightning.fabric`` registries. Calling it again changes nothing.

It also corrects three choices Lightning 2.6.6 makes for accelerators it does not
know, each of which was seen with ``accelerator="xpu"``:

1. ``devices=1`` with the automatic strategy gives ``SingleDeviceStrategy("cpu")``:
   the model silently trains on the CPU.
2. ``devices>1`` gives ``DDPStrategy``, whose model set-up enters
   a CUDA stream for any non-CPU device: a crash at start-up.
3. ``precision="bf16-mixed"``/``"16-mixed"`` autocast on ``"cuda"`` whatever the device.

The corrections wrap the connectors' own choice methods and act only when the
chosen accelerator is one of ours (:class:`DeviceAccelerator`); every other
configuration goes through Lightning untouched.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

from lightning.fabric import connector as fabric_connector
from lightning.fabric.accelerators import ACCELERATOR_REGISTRY
from lightning.fabric.plugins.precision.amp import (
    MixedPrecision as FabricMixedPrecision,
)
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.fabric.strategies import DDPStrategy as FabricDDPStrategy
from lightning.fabric.strategies import (
    SingleDeviceStrategy as FabricSingleDeviceStrategy,
)
from lightning.fabric.utilities.imports import _IS_INTERACTIVE
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import (
    DDPStrategy,
    SingleDeviceStrategy,
    StrategyRegistry,
)
from lightning.pytorch.trainer.connectors import (
    accelerator_connector as trainer_connector,
)

from lightning_pp.integration.accelerators import (
    DeviceAccelerator,
    NPUAccelerator,
    XPUAccelerator,
)
from lightning_pp.integration.device_ddp import (
    DeviceDDPStrategy,
    FabricDeviceDDPStrategy,
)
from lightning_pp.integration.strategy import PPStrategy
from lightning_pp.platform import current_platform, platform_for

__all__ = ["register"]

_ACCELERATORS = {
    "xpu": (XPUAccelerator, "Intel GPUs (lightning_pp)"),
    "npu": (NPUAccelerator, "Ascend NPUs (lightning_pp)"),
}

# Marks a connector method we already wrapped, so re-registration is a no-op.
_PATCHED = "__lightning_pp_patched__"


def register() -> None:
    """Registers lightning_pp's accelerators and strategies and patches the connectors (idempotent)."""
    for name, (cls, description) in _ACCELERATORS.items():
        for registry in (AcceleratorRegistry, ACCELERATOR_REGISTRY):
            if name not in registry:
                registry.register(name, cls, description=description)
    _register_strategies()
    _patch_connector(trainer_connector._AcceleratorConnector, _TRAINER_CLASSES)
    _patch_connector(fabric_connector._Connector, _FABRIC_CLASSES)


def _register_strategies() -> None:
    for name, (cls, description) in _strategies().items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, cls, description=description)


def _strategies() -> dict[str, tuple[type, str]]:
    return {PPStrategy.strategy_name: (PPStrategy, "Pipeline parallelism (lightning_pp)")}


# The Trainer and Fabric connectors mirror each other; only the classes differ.
_TRAINER_CLASSES = {
    "ddp": DDPStrategy,
    "device_ddp": DeviceDDPStrategy,
    "single": SingleDeviceStrategy,
    "mixed": MixedPrecision,
    "registry": StrategyRegistry,
}
_FABRIC_CLASSES = {
    "ddp": FabricDDPStrategy,
    "device_ddp": FabricDeviceDDPStrategy,
    "single": FabricSingleDeviceStrategy,
    "mixed": FabricMixedPrecision,
    "registry": STRATEGY_REGISTRY,
}


def _ours(connector: Any) -> bool:
    return isinstance(getattr(connector, "accelerator", None), DeviceAccelerator)


def _patch(owner: type, name: str, make_wrapper: Callable[[Callable], Callable], static: bool = False) -> None:
    original = owner.__dict__[name]
    original_fn = original.__func__ if isinstance(original, staticmethod) else original
    if getattr(original_fn, _PATCHED, False):
        return
    wrapper = functools.wraps(original_fn)(make_wrapper(original_fn))
    setattr(wrapper, _PATCHED, True)
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)


def _patch_connector(owner: type, classes: dict[str, Any]) -> None:
    def choose_auto_accelerator(original: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            choice = original(*args, **kwargs)
            # `accelerator="auto"` should find an XPU/NPU too, not settle for the CPU.
            detected = current_platform().device_type
            if choice == "cpu" and detected in _ACCELERATORS and current_platform().is_available():
                return detected
            return choice

        return wrapper

    def choose_strategy(original: Callable) -> Callable:
        def wrapper(self: Any) -> Any:
            if not _ours(self):
                return original(self)
            if self._num_nodes_flag > 1 or len(self._parallel_devices) > 1:
                start_method = "fork" if _IS_INTERACTIVE else "popen"
                return classes["device_ddp"](start_method=start_method)
            return classes["single"](device=self._parallel_devices[0])

        return wrapper

    def init_strategy(original: Callable) -> Callable:
        def wrapper(self: Any) -> None:
            original(self)
            # `strategy="ddp"` (or an alias) named as a string with our accelerator:
            # rebuild it as the device-aware DDP with the alias's own arguments.
            flag = self._strategy_flag
            if _ours(self) and isinstance(flag, str) and type(self.strategy) is classes["ddp"]:
                init_params = classes["registry"][flag]["init_params"]
                self.strategy = classes["device_ddp"](**init_params)

        return wrapper

    def check_and_init_precision(original: Callable) -> Callable:
        def wrapper(self: Any) -> Any:
            with warnings.catch_warnings():
                if _ours(self):
                    # Lightning first builds a CUDA grad scaler that we replace below;
                    # its "CUDA is not available" warning would only mislead.
                    warnings.filterwarnings("ignore", message=".*GradScaler is enabled, but CUDA is not available")
                plugin = original(self)
            if _ours(self) and type(plugin) is classes["mixed"]:
                device_type = platform_for(self.accelerator.device_type).autocast_device_type
                if plugin.device != device_type:
                    plugin = classes["mixed"](precision=plugin.precision, device=device_type, scaler=None)
            return plugin

        return wrapper

    _patch(owner, "_choose_auto_accelerator", choose_auto_accelerator, static=True)
    _patch(owner, "_choose_strategy", choose_strategy)
    _patch(owner, "_init_strategy", init_strategy)
    _patch(owner, "_check_and_init_precision", check_and_init_precision)
