"""Accelerator registration and device-correct Lightning choices, on faked XPU/NPU devices."""

import importlib

import lightning as L
import pytest
import torch
from lightning.fabric.accelerators import ACCELERATOR_REGISTRY
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_pp
import lightning_pp.integration
from lightning_pp import NPUAccelerator, XPUAccelerator
from lightning_pp.integration import DeviceDDPStrategy, FabricDeviceDDPStrategy
from lightning_pp.integration.accelerators.base import parse_device_indices
from lightning_pp.platform import make_platform, use_platform

from fakes import FakeDeviceModule, install_fake_npu
from multirank import run_on_ranks

TRAINER_KW = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture
def fake_xpu():
    module = FakeDeviceModule("xpu", count=4)
    with use_platform(make_platform("xpu", device_module=module)):
        yield module


def test_registered_in_trainer_and_fabric_registries_idempotently():
    for registry in (AcceleratorRegistry, ACCELERATOR_REGISTRY):
        assert registry["xpu"]["accelerator"] is XPUAccelerator
        assert registry["npu"]["accelerator"] is NPUAccelerator
    lightning_pp.integration.register()
    importlib.reload(lightning_pp)  # re-import must not raise "already present"
    importlib.reload(lightning_pp.integration)
    assert AcceleratorRegistry["xpu"]["accelerator"] is lightning_pp.XPUAccelerator


def test_missing_xpu_fails_at_once_naming_what_is_missing():
    with pytest.raises(MisconfigurationException, match=r"XPU is not usable here: .*compiled without XPU"):
        L.Trainer(accelerator="xpu", **TRAINER_KW)
    with pytest.raises(MisconfigurationException, match="XPU is not usable"):
        L.Fabric(accelerator="xpu")


def test_missing_npu_says_to_install_torch_npu():
    with pytest.raises(
        MisconfigurationException, match=r"NPU is not usable here: torch_npu is not installed.*pip install"
    ):
        L.Trainer(accelerator="npu", **TRAINER_KW)


def test_one_xpu_device_runs_on_the_xpu_not_the_cpu(fake_xpu):
    trainer = L.Trainer(accelerator="xpu", devices=1, **TRAINER_KW)
    assert type(trainer.strategy) is SingleDeviceStrategy
    assert trainer.strategy.root_device == torch.device("xpu", 0)
    trainer = L.Trainer(accelerator="xpu", devices=[2], **TRAINER_KW)
    assert trainer.strategy.root_device == torch.device("xpu", 2)


def test_many_xpu_devices_get_device_aware_ddp(fake_xpu):
    trainer = L.Trainer(accelerator="xpu", devices=2, **TRAINER_KW)
    strategy = trainer.strategy
    assert type(strategy) is DeviceDDPStrategy
    assert strategy.parallel_devices == [torch.device("xpu", 0), torch.device("xpu", 1)]
    assert strategy._get_process_group_backend() == "xccl"
    assert trainer.accelerator.auto_device_count() == 4


@pytest.mark.parametrize("alias, start_method", [("ddp", "popen"), ("ddp_spawn", "spawn")])
def test_ddp_named_by_string_becomes_device_aware(fake_xpu, alias, start_method):
    trainer = L.Trainer(accelerator="xpu", devices=2, strategy=alias, **TRAINER_KW)
    assert type(trainer.strategy) is DeviceDDPStrategy
    assert trainer.strategy._start_method == start_method


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_autocasts_on_the_xpu(fake_xpu, precision):
    trainer = L.Trainer(accelerator="xpu", devices=2, precision=precision, **TRAINER_KW)
    plugin = trainer.precision_plugin
    assert plugin.device == "xpu" and plugin.precision == precision
    assert (plugin.scaler is not None) == (precision == "16-mixed")


def test_fabric_gets_the_same_corrections(fake_xpu):
    fabric = L.Fabric(accelerator="xpu", devices=1, precision="bf16-mixed")
    assert fabric.strategy.root_device == torch.device("xpu", 0)
    assert fabric._precision.device == "xpu"
    fabric = L.Fabric(accelerator="xpu", devices=2)
    assert type(fabric.strategy) is FabricDeviceDDPStrategy


def test_device_ddp_sets_up_the_model_on_the_platform_stream(fake_xpu, monkeypatch):
    seen = {}

    def fake_ddp(module, device_ids, **kwargs):
        seen["stream"] = fake_xpu.current_stream()
        seen["device_ids"] = device_ids
        return module

    monkeypatch.setattr("lightning_pp.integration.device_ddp.DistributedDataParallel", fake_ddp)
    trainer = L.Trainer(accelerator="xpu", devices=[3, 1], **TRAINER_KW)
    strategy = trainer.strategy
    assert strategy.root_device == torch.device("xpu", 3)
    strategy._setup_model(torch.nn.Linear(2, 2))
    assert seen["device_ids"] == [3]
    assert seen["stream"] is not fake_xpu.default_stream and seen["stream"].device == torch.device("xpu", 3)


def test_cpu_choices_are_left_to_lightning():
    trainer = L.Trainer(accelerator="cpu", devices=2, precision="bf16-mixed", **TRAINER_KW)
    assert type(trainer.strategy) is DDPStrategy
    assert trainer.precision_plugin.device == "cpu"
    assert type(L.Trainer(accelerator="auto", devices=1, **TRAINER_KW).strategy) is SingleDeviceStrategy


@pytest.mark.parametrize(
    "devices, count, expected",
    [(1, 2, [0]), (2, 2, [0, 1]), (-1, 3, [0, 1, 2]), ("auto", 2, [0, 1]), ("2", 4, [0, 1]), ("1,3", 4, [1, 3]),
     ([2], 4, [2]), ("[0, 2]", 4, [0, 2])],
)
def test_parse_device_indices(devices, count, expected):
    assert parse_device_indices(devices, count, "XPU") == expected


@pytest.mark.parametrize(
    "devices, match", [(3, "has 2 XPU"), ([0, 5], "has 2 XPU"), (0, "asks for no"), ([1, 1], "distinct")]
)
def test_parse_device_indices_rejects(devices, match):
    with pytest.raises(MisconfigurationException, match=match):
        parse_device_indices(devices, 2, "XPU")


def _npu_choices(rank, world_size):
    import lightning as L

    import lightning_pp  # noqa: F401 - registers "npu"
    from lightning_pp.platform import make_platform, use_platform

    module = install_fake_npu(count=2)
    with use_platform(make_platform("npu", device_module=module, dist_backend="hccl")):
        one = L.Trainer(accelerator="npu", devices=1, precision="bf16-mixed", **TRAINER_KW)
        two = L.Trainer(accelerator="npu", devices=2, **TRAINER_KW)
        return {
            "single": (type(one.strategy).__name__, str(one.strategy.root_device), one.precision_plugin.device),
            "ddp": (type(two.strategy).__name__, two.strategy._get_process_group_backend()),
        }


def test_npu_paths_with_a_faked_torch_npu():
    # Faking "npu" renames torch's PrivateUse1 device for the whole process: do it in a child.
    (result,) = run_on_ranks(_npu_choices, 1, init_process_group=False, timeout=120)
    assert result["single"] == ("SingleDeviceStrategy", "npu:0", "npu")
    assert result["ddp"] == ("DeviceDDPStrategy", "hccl")
