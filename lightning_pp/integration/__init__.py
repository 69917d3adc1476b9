"""Lightning strategies shipped by lightning_pp."""

from lightning_pp.strategies.device_ddp import DeviceDDPStrategy, FabricDeviceDDPStrategy

__all__ = ["DeviceDDPStrategy", "FabricDeviceDDPStrategy"]
