import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_pp import platform as platform_mod
from lightning_pp.platform import (
    CPUEvent,
    current_platform,
    distributed_backend_for,
    make_platform,
    platform_for,
    use_platform,
)

from fakes import FakeDeviceModule

PACKAGE = Path(platform_mod.__file__).parent

# What only the platform module may name.
_DEVICE_CODE = re.compile(r"torch\.(cuda|xpu|npu)\b|torch_npu|[\"'](nccl|xccl|hccl|gloo)[\"']")


def test_only_the_platform_module_names_devices_or_backends():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "platform.py" and path.parent == PACKAGE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _DEVICE_CODE.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "device code outside lightning_pp/platform.py:\n" + "\n".join(offenders)


def test_guard_pattern_catches_what_it_should():
    # The guard above is only as good as its pattern: prove it can fail.
    for line in ['torch.cuda.synchronize()', 'import torch_npu', 'backend = "nccl"', "torch.xpu.Event()"]:
        assert _DEVICE_CODE.search(line), line
    for line in ['torch.Event()', 'platform.dist_backend', '"cudagraph"']:
        assert not _DEVICE_CODE.search(line), line


def _fresh_interpreter(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout.strip()


def test_platform_is_resolved_at_import_and_env_var_overrides_it():
    # Nothing has to be initialised first: the platform exists as soon as the module does.
    code = "from lightning_pp.platform import current_platform as c; p = c(); print(p.device_type, p.dist_backend)"
    assert _fresh_interpreter(code, LIGHTNING_PP_DEVICE="") == "cpu gloo"
    assert _fresh_interpreter(code, LIGHTNING_PP_DEVICE="xpu") == "xpu xccl"


@pytest.mark.parametrize(
    "device_type, backend",
    [("cpu", "gloo"), ("cuda", "nccl"), ("xpu", "xccl"), ("mps", "gloo"), ("made-up", "gloo")],
)
def test_backend_comes_from_torchs_map(device_type, backend):
    assert distributed_backend_for(device_type) == backend
    assert torch.distributed.Backend.default_device_backend_map.get(device_type, "gloo") == backend


@pytest.mark.parametrize(
    "device_type, waits, async_copy",
    [("cpu", True, False), ("mps", True, False), ("cuda", True, True), ("xpu", True, True), ("npu", True, True),
     ("made-up", True, False)],
)
def test_capabilities(device_type, waits, async_copy):
    platform = make_platform(device_type, device_module=FakeDeviceModule(device_type))
    assert platform.send_waits_for_receiver is waits
    assert platform.supports_async_copy is async_copy
    assert platform.has_fused_allreduce is False  # flashinfer is not installed here
    assert platform.transfers_wait_on_stream("gloo") is False
    assert platform.transfers_wait_on_stream("nccl") is (device_type in ("cuda", "xpu", "npu"))


def test_cpu_platform_streams_events_and_copies():
    cpu = make_platform("cpu")
    assert cpu.device(3) == torch.device("cpu")
    assert cpu.is_available() and cpu.device_count() == 1
    cpu.synchronize()
    start, end = cpu.event(enable_timing=True), cpu.event(enable_timing=True)
    assert isinstance(start, CPUEvent)
    cpu.record(start)
    sum(range(10000))
    cpu.record(end)
    assert end.elapsed_time(start) <= 0 <= start.elapsed_time(end)
    cpu.wait_event(end)
    with cpu.use_stream(cpu.stream()):
        pass
    tensor = torch.ones(3)
    assert cpu.pin(tensor) is tensor
    assert cpu.to_device(tensor, torch.device("cpu")) is tensor
    assert cpu.memory_stats()["peak_rss_bytes"] > 0
    with pytest.raises(RuntimeError, match="recorded"):
        CPUEvent().elapsed_time(CPUEvent())


def test_device_platform_routes_through_its_device_module():
    fake = FakeDeviceModule("xpu", count=3)
    xpu = make_platform("xpu", device_module=fake)
    assert xpu.device(1) == torch.device("xpu", 1)
    assert xpu.device_count() == 3
    xpu.set_device(torch.device("xpu", 2))
    side = xpu.stream(xpu.device(0))
    assert side.device == torch.device("xpu", 0)
    with xpu.use_stream(side):
        assert xpu.current_stream() is side
        event = xpu.record(xpu.event())
    assert event.recorded_on is side
    xpu.wait_event(event)
    assert ("stream.wait_event", fake.default_stream, event) in fake.calls
    xpu.synchronize()
    assert ("set_device", 2) in fake.calls and ("synchronize", None) in fake.calls
    assert xpu.memory_stats() == {"allocated_bytes.all.current": 1234}
    assert xpu.autocast_device_type == "xpu"


def test_use_platform_overrides_and_restores():
    before = current_platform()
    fake = make_platform("xpu", device_module=FakeDeviceModule())
    with use_platform(fake) as installed:
        assert current_platform() is installed is fake
        assert platform_for("xpu:1") is fake
        assert platform_for(torch.device("cpu")).device_type == "cpu"
    assert current_platform() is before


def test_unavailable_devices_say_what_is_missing():
    assert "compiled without XPU support" in make_platform("xpu").why_unavailable()
    npu = make_platform("npu").why_unavailable()
    assert "torch_npu is not installed" in npu and "pip install" in npu
    assert make_platform("cpu").why_unavailable() is None
