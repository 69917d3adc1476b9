"""allreduce_add_rmsnorm: the contract, the exact fallback on gloo ranks, and the
FlashInfer dispatch (workspaces, agreement, broadcast root) against a fake FlashInfer."""

from __future__ import annotations

import dataclasses
import sys
import types
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_pp.distributed.topology import MeshShape, ParallelGroup, build_topology
from lightning_pp.parallel import (
    allreduce_add_rmsnorm,
    destroy_allreduce_fusion_workspaces,
    flashinfer_fusion,
    pre_initialize_allreduce_fusion,
)
from lightning_pp.parallel.flashinfer_fusion import (
    choose_oneshot,
    make_comm_backend,
    unsupported_reason,
)
from lightning_pp.platform import current_platform, use_platform

from multirank import run_on_ranks

HIDDEN = 32
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


# -- the reference ----------------------------------------------------------------------


def _inputs(global_rank: int, num_tokens: int, dtype: torch.dtype, seed: int = 0) -> tuple:
    """x differs per rank; residual and weight are shared. Rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed * 1000 + num_tokens)
    residual = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(dtype)
    own = torch.Generator().manual_seed(seed * 1000 + num_tokens * 17 + global_rank + 1)
    x = torch.randn(num_tokens, HIDDEN, generator=own)
    return x.to(dtype), residual, weight


def _reference(xs: list, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> tuple:
    """The contract, in fp32, written independently of the package."""
    total = torch.stack([x.float() for x in xs]).sum(0) + residual.float()
    normed = total / torch.sqrt((total * total).mean(-1, keepdim=True) + eps) * weight.float()
    return normed, total


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    tol = TOLERANCE[dtype]
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want, atol=tol * max(1.0, scale), rtol=tol)


# -- pure checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, expect",
    [
        (dict(group_size=2, num_tokens=8, hidden_size=32, dtype=torch.bfloat16), None),
        (dict(group_size=16, num_tokens=1, hidden_size=32, dtype=torch.float32), None),
        (dict(group_size=3, num_tokens=8, hidden_size=32, dtype=torch.float16), "group size 3"),
        (dict(group_size=1, num_tokens=8, hidden_size=32, dtype=torch.float16), "group size 1"),
        (dict(group_size=32, num_tokens=8, hidden_size=32, dtype=torch.float16), "group size 32"),
        (dict(group_size=4, num_tokens=8, hidden_size=32, dtype=torch.float64), "dtype"),
        (dict(group_size=4, num_tokens=0, hidden_size=32, dtype=torch.float16), "idle batch"),
        (dict(group_size=4, num_tokens=65, hidden_size=32, dtype=torch.float16, max_num_tokens=64), "exceed"),
        (dict(group_size=4, num_tokens=64, hidden_size=32, dtype=torch.float16, max_num_tokens=64), None),
    ],
)
def test_unsupported_reason_table(kwargs, expect):
    reason = unsupported_reason(**kwargs)
    if expect is None:
        assert reason is None
    else:
        assert expect in reason


@pytest.mark.parametrize(
    "num_tokens, group_size, expect",
    # two-shot splits tokens over ranks: with no more tokens than ranks only one-shot is correct
    [(1, 2, True), (2, 2, True), (3, 2, None), (4, 4, True), (5, 4, None), (8, 8, True), (9, 8, None),
     (16, 16, True), (17, 16, False)],
)
def test_choose_oneshot_table(num_tokens, group_size, expect):
    assert choose_oneshot(num_tokens, group_size) is expect


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_single_process_matches_contract(dtype, num_tokens):
    x, residual, weight = _inputs(0, num_tokens, dtype)
    normed, residual_out = allreduce_add_rmsnorm(x, residual, weight, eps=1e-5, group=ParallelGroup.single())
    want_normed, want_residual = _reference([x], residual, weight, eps=1e-5)
    _assert_close(normed, want_normed, dtype)
    _assert_close(residual_out, want_residual, dtype)
    # group=None without torch.distributed is a single process too.
    again = allreduce_add_rmsnorm(x, residual, weight, eps=1e-5)
    assert torch.equal(again[0], normed)


def test_keeps_leading_dims_and_is_differentiable():
    x = torch.randn(2, 3, HIDDEN, requires_grad=True)
    residual = torch.randn(2, 3, HIDDEN, requires_grad=True)
    weight = torch.randn(HIDDEN, requires_grad=True)
    normed, residual_out = allreduce_add_rmsnorm(x, residual, weight)
    assert normed.shape == residual_out.shape == (2, 3, HIDDEN)
    (normed.sum() + residual_out.sum()).backward()
    assert x.grad is not None and weight.grad is not None
    torch.testing.assert_close(x.grad, residual.grad)


@pytest.mark.parametrize(
    "x, residual, weight, match",
    [
        (torch.zeros(2, 4), torch.zeros(3, 4), torch.ones(4), "same shape"),
        (torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bfloat16), torch.ones(4), "cast"),
        (torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(5), "weight must have shape"),
        (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64), torch.ones(4), "supports"),
    ],
)
def test_rejects_bad_inputs(x, residual, weight, match):
    with pytest.raises(ValueError, match=match):
        allreduce_add_rmsnorm(x, residual, weight)


# -- the fallback on 4 gloo ranks ---------------------------------------------------------

TOKEN_COUNTS = (1, 2, 3, 17, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fallback_on_rank(rank: int, world_size: int) -> dict:
    # pp2 x tp2: tp groups (0, 1) and (2, 3); cp2 x tp2: cp groups (0, 2) and (1, 3),
    # MLP-TP (0, 1, 2, 3). Several of them exclude global rank 0.
    pp_tp = build_topology(MeshShape(pp=2, tp=2), device_type="cpu")
    cp_tp = build_topology(MeshShape(cp=2, tp=2), device_type="cpu")
    groups = {"pp_tp.tp": pp_tp.tp, "cp_tp.cp": cp_tp.cp, "cp_tp.mlp_tp": cp_tp.mlp_tp, "world": None}
    out = {}
    for label, group in groups.items():
        for dtype in DTYPES:
            for n in TOKEN_COUNTS:
                x, residual, weight = _inputs(rank, n, dtype)
                out[(label, str(dtype), n)] = allreduce_add_rmsnorm(x, residual, weight, group=group)
    out["members"] = {label: (g.ranks if g is not None else tuple(range(world_size))) for label, g in groups.items()}
    return out


def test_fallback_matches_reference_on_subgroups():
    results = run_on_ranks(_fallback_on_rank, 4)
    for label, members in results[0]["members"].items():
        for dtype in DTYPES:
            for n in TOKEN_COUNTS:
                xs = [_inputs(r, n, dtype)[0] for r in members]
                _, residual, weight = _inputs(0, n, dtype)
                want_normed, want_residual = _reference(xs, residual, weight)
                for r in members:
                    normed, residual_out = results[r][(label, str(dtype), n)]
                    _assert_close(normed, want_normed, dtype)
                    _assert_close(residual_out, want_residual, dtype)
                    # Replicated outputs are bitwise equal on every member.
                    assert torch.equal(normed, results[members[0]][(label, str(dtype), n)][0])


# -- the FlashInfer path, against a fake FlashInfer ----------------------------------------


class _FakeTorchDistBackend:
    """Mimics flashinfer.comm.mnnvl.TorchDistBackend of releases before 0.6.13.

    Its bcast passes the group-local root straight to torch as a global rank: the
    bug the package's subclass must not inherit.
    """

    def __init__(self, group: Any = None) -> None:
        self._group = group

    def Get_rank(self) -> int:
        return dist.get_rank(self._group)

    def Get_size(self) -> int:
        return dist.get_world_size(self._group)

    def allgather(self, data: Any) -> list:
        out = [None] * self.Get_size()
        dist.all_gather_object(out, data, group=self._group)
        return out

    def bcast(self, data: Any, root: int) -> Any:
        objects = [data]
        dist.broadcast_object_list(objects, src=root, group=self._group)
        return objects[0]

    def barrier(self) -> None:
        dist.barrier(group=self._group)


class _FakeWorkspace:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.destroyed = False

    def destroy(self) -> None:
        self.destroyed = True


def _install_fake_flashinfer(calls: list) -> None:
    """Puts a fake flashinfer.comm into sys.modules (this process only)."""
    comm = types.ModuleType("flashinfer.comm")
    mnnvl = types.ModuleType("flashinfer.comm.mnnvl")
    mnnvl.TorchDistBackend = _FakeTorchDistBackend
    comm.AllReduceFusionPattern = types.SimpleNamespace(kARResidualRMSNorm=1)

    def create_allreduce_fusion_workspace(backend="auto", world_size=None, rank=None, max_token_num=None,
                                          hidden_dim=None, dtype=None, gpus_per_node=None, comm_backend=None,
                                          force_oneshot_support=False, group=None) -> _FakeWorkspace:
        kwargs = dict(backend=backend, world_size=world_size, rank=rank, max_token_num=max_token_num,
                      hidden_dim=hidden_dim, dtype=dtype, group=group)
        backend, size = comm_backend, world_size
        # A rendezvous like the real one: broadcasts from group-local roots,
        # an allgather and a barrier over the communication backend.
        from_first = backend.bcast(f"from group rank 0 (global {dist.get_rank()})" if rank == 0 else None, root=0)
        from_last = backend.bcast(f"from group rank {size - 1}" if rank == size - 1 else None, root=size - 1)
        gathered = backend.allgather(rank)
        backend.barrier()
        recorded = dict(kwargs, comm_backend=type(backend).__name__, group=tuple(dist.get_process_group_ranks(group)))
        calls.append(("create", recorded, from_first, from_last, gathered))
        return _FakeWorkspace(**kwargs)

    def allreduce_fusion(*, input, workspace, pattern, residual_out, norm_out, residual_in, rms_gamma, rms_eps,
                         use_oneshot, fp32_acc, launch_with_pdl, **_: Any):
        # A CPU stand-in for the kernel: the same contract, via an ordinary all-reduce.
        total = input.float().clone()
        dist.all_reduce(total, group=workspace.kwargs["group"])
        total += residual_in.float()
        residual_out.copy_(total)
        norm_out.copy_(total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + rms_eps) * rms_gamma.float())
        calls.append(("kernel", tuple(input.shape), input.dtype, pattern, use_oneshot, fp32_acc))
        return norm_out

    comm.create_allreduce_fusion_workspace = create_allreduce_fusion_workspace
    comm.allreduce_fusion = allreduce_fusion
    comm.mnnvl = mnnvl
    flashinfer = types.ModuleType("flashinfer")
    flashinfer.comm = comm
    sys.modules.update({"flashinfer": flashinfer, "flashinfer.comm": comm, "flashinfer.comm.mnnvl": mnnvl})


def _fused_platform(enabled: bool = True):
    return dataclasses.replace(current_platform(), has_fused_allreduce=enabled)


def _fake_kernel_on_rank(rank: int, world_size: int) -> dict:
    calls: list = []
    _install_fake_flashinfer(calls)
    broadcasts: list = []
    real_broadcast = dist.broadcast_object_list

    def recording_broadcast(objects, src=None, group=None, **kw):
        broadcasts.append((src, group))
        return real_broadcast(objects, src=src, group=group, **kw)

    dist.broadcast_object_list = recording_broadcast
    out: dict = {}
    try:
        topo = build_topology(MeshShape(pp=2, tp=2), device_type="cpu")
        tp = topo.tp  # (0, 1) or (2, 3)
        # A CPU twin distinct from the device group, so we can see which one bcast used.
        twins = [dist.new_group(list(r), backend="gloo") for r in ((0, 1), (2, 3))]
        group = ParallelGroup("tp", tp.ranks, device_group=tp.device_group, cpu_group=twins[rank // 2])

        with use_platform(_fused_platform()):
            out["enabled"] = pre_initialize_allreduce_fusion(
                [group], max_num_tokens=16, hidden_size=HIDDEN, dtype=torch.float32
            )
            out["create"] = [c for c in calls if c[0] == "create"]
            out["bcast_on_twin"] = [g is group.cpu_group for _, g in broadcasts]
            out["bcast_src"] = [src for src, _ in broadcasts]
            # A second pre-initialisation with the same key creates nothing new.
            pre_initialize_allreduce_fusion([group], max_num_tokens=16, hidden_size=HIDDEN, dtype=torch.float32)
            out["creates_after_repeat"] = sum(c[0] == "create" for c in calls)

            cases = {
                "kernel_2": (2, torch.float32, False),
                "kernel_16": (16, torch.float32, False),
                "too_many_tokens": (17, torch.float32, False),
                "other_dtype": (4, torch.bfloat16, False),
                "needs_grad": (4, torch.float32, True),
                "idle": (0, torch.float32, False),
            }
            for name, (n, dtype, grad) in cases.items():
                before = len(calls)
                x, residual, weight = _inputs(rank, n, dtype)
                x.requires_grad_(grad)
                normed, residual_out = allreduce_add_rmsnorm(x, residual, weight, group=group)
                out[name] = {
                    "kernel_calls": [c for c in calls[before:] if c[0] == "kernel"],
                    "normed": normed.detach(),
                    "residual": residual_out.detach(),
                }
            # The bare device group finds the same workspace.
            before = len(calls)
            allreduce_add_rmsnorm(*_inputs(rank, 3, torch.float32), group=group.device_group)
            out["by_process_group"] = len(calls) - before

        # Agreement: rank 3 lacks the kernel, so the world group falls back on every
        # rank, and nobody starts FlashInfer's rendezvous (which would hang).
        world = ParallelGroup("world", (0, 1, 2, 3), device_group=dist.group.WORLD, cpu_group=dist.group.WORLD)
        with use_platform(_fused_platform(enabled=rank != 3)):
            before = len(calls)
            out["world_enabled"] = pre_initialize_allreduce_fusion(
                [world], max_num_tokens=16, hidden_size=HIDDEN, dtype=torch.float32
            )
            x, residual, weight = _inputs(rank, 4, torch.float32)
            out["world_result"] = allreduce_add_rmsnorm(x, residual, weight, group=world)
            out["world_calls"] = calls[before:]
        destroy_allreduce_fusion_workspaces()
        out["after_destroy"] = flashinfer_fusion.find_workspace(group.device_group, 4, HIDDEN, torch.float32)
    finally:
        dist.broadcast_object_list = real_broadcast
    out["tp_ranks"] = group.ranks
    out["bcast_root"] = _bcast_root_check(rank)
    return out


@pytest.fixture(scope="module")
def fake_kernel_results() -> list:
    # One spawn for every fake-FlashInfer check: each spawn of 4 ranks costs seconds.
    return run_on_ranks(_fake_kernel_on_rank, 4)


def test_fake_flashinfer_dispatch_and_agreement(fake_kernel_results):
    for rank, res in enumerate(fake_kernel_results):
        members = res["tp_ranks"]
        assert res["enabled"] == {"tp": True}
        (create,) = res["create"]
        _, kwargs, from_first, from_last, gathered = create
        # Group-local rank and size go to FlashInfer; the device group is the rendezvous group.
        assert kwargs["rank"] == members.index(rank) and kwargs["world_size"] == 2
        assert kwargs["backend"] == "trtllm" and kwargs["comm_backend"] == "SubgroupCommBackend"
        assert kwargs["group"] == members  # symmetric memory meets over the sub-group, not the world
        assert (kwargs["max_token_num"], kwargs["hidden_dim"], kwargs["dtype"]) == (16, HIDDEN, torch.float32)
        # The broadcast roots were converted to global ranks, and ran on the CPU twin.
        assert from_first == f"from group rank 0 (global {members[0]})"
        assert from_last == "from group rank 1"
        assert gathered == [0, 1]
        assert res["bcast_src"] == [members[0], members[1]]
        assert res["bcast_on_twin"] == [True, True]
        assert res["creates_after_repeat"] == 1

        for name, n, expect_kernel, oneshot in [
            ("kernel_2", 2, True, True), ("kernel_16", 16, True, None), ("too_many_tokens", 17, False, None),
            ("other_dtype", 4, False, None), ("needs_grad", 4, False, None), ("idle", 0, False, None),
        ]:
            case = res[name]
            assert bool(case["kernel_calls"]) is expect_kernel, (rank, name)
            if expect_kernel:
                (_, shape, dtype, pattern, use_oneshot, fp32_acc) = case["kernel_calls"][0]
                assert shape == (n, HIDDEN) and pattern == 1 and use_oneshot is oneshot and fp32_acc is True
            dtype = torch.bfloat16 if name == "other_dtype" else torch.float32
            xs = [_inputs(r, n, dtype)[0] for r in members]
            _, residual, weight = _inputs(0, n, dtype)
            want_normed, want_residual = _reference(xs, residual, weight)
            _assert_close(case["normed"], want_normed, dtype)
            _assert_close(case["residual"], want_residual, dtype)
        assert res["by_process_group"] == 1

        assert res["world_enabled"] == {"world": False}
        assert res["world_calls"] == []  # no rendezvous, no kernel, on any rank
        xs = [_inputs(r, 4, torch.float32)[0] for r in range(4)]
        _, residual, weight = _inputs(0, 4, torch.float32)
        want_normed, _ = _reference(xs, residual, weight)
        _assert_close(res["world_result"][0], want_normed, torch.float32)
        assert res["after_destroy"] is None


def _bcast_root_check(rank: int) -> list:
    topo = build_topology(MeshShape(cp=2, tp=2), device_type="cpu")
    cp = topo.cp  # (0, 2) or (1, 3): the second never contains global rank 0
    backend = make_comm_backend(cp)
    got = []
    for root in range(cp.size):
        got.append(backend.bcast(("payload", rank) if cp.rank == root else None, root=root))
    # The parent's bcast, which the subclass replaces, fails on the group without rank 0.
    try:
        _FakeTorchDistBackend.bcast(backend, "x", 0)
        got.append("parent bcast worked")
    except Exception as exc:  # noqa: BLE001
        got.append(type(exc).__name__)
    return [cp.ranks, got]


def test_comm_backend_bcast_converts_group_root_to_global_rank(fake_kernel_results):
    results = [res["bcast_root"] for res in fake_kernel_results]
    for _rank, (members, got) in enumerate(results):
        assert got[:2] == [("payload", members[0]), ("payload", members[1])]
    # Only the group (1, 3) lacks global rank 0: the group-rank-as-global bug shows there.
    assert results[1][1][2] != "parent bcast worked" and results[3][1][2] != "parent bcast worked"


# -- the real kernel (needs 2+ CUDA devices and flashinfer-python) -------------------------


def _real_kernel_on_rank(rank: int, world_size: int) -> list:
    platform = current_platform()
    platform.set_device(rank)
    dist.init_process_group(platform.dist_backend, rank=rank, world_size=world_size)
    try:
        group = ParallelGroup(
            "world", tuple(range(world_size)), device_group=dist.group.WORLD,
            cpu_group=dist.new_group(list(range(world_size)), backend="gloo"),
        )
        enabled = pre_initialize_allreduce_fusion([group], max_num_tokens=64, hidden_size=HIDDEN, dtype=torch.bfloat16)
        out = [enabled]
        with torch.no_grad():
            for n in (1, 7, 64):
                x, residual, weight = (t.to(platform.device(rank)) for t in _inputs(rank, n, torch.bfloat16))
                normed, residual_out = allreduce_add_rmsnorm(x, residual, weight, group=group)
                out.append((n, normed.cpu(), residual_out.cpu()))
        destroy_allreduce_fusion_workspaces()
        return out
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(
    not current_platform().has_fused_allreduce or current_platform().device_count() < 2,
    reason="needs 2 CUDA devices and flashinfer-python",
)
def test_flashinfer_kernel_matches_reference_on_gpu():
    results = run_on_ranks(_real_kernel_on_rank, 2, init_process_group=False, timeout=600)
    for _rank, res in enumerate(results):
        assert res[0] == {"world": True}
        for n, normed, residual_out in res[1:]:
            xs = [_inputs(r, n, torch.bfloat16)[0] for r in range(2)]
            _, residual, weight = _inputs(0, n, torch.bfloat16)
            want_normed, want_residual = _reference(xs, residual, weight)
            _assert_close(normed, want_normed, torch.bfloat16)
            _assert_close(residual_out, want_residual, torch.bfloat16)


def test_groups_without_process_groups_are_refused_not_widened_to_the_world():
    # A two-rank ParallelGroup with no ProcessGroup must not silently act on WORLD.
    bare = ParallelGroup("tp", (0, 1))
    x = torch.zeros(2, HIDDEN)
    with pytest.raises(ValueError, match="no device group"):
        allreduce_add_rmsnorm(x, x, torch.ones(HIDDEN), group=bare)
    with pytest.raises(ValueError, match="CPU twin"):
        pre_initialize_allreduce_fusion([bare], max_num_tokens=8, hidden_size=HIDDEN, dtype=torch.float32)
    # A group of one needs nothing and runs nothing.
    assert pre_initialize_allreduce_fusion(
        [ParallelGroup.single("solo")], max_num_tokens=8, hidden_size=HIDDEN, dtype=torch.float32
    ) == {"solo": False}
