"""``PPStrategy``: pipeline parallelism for an unchanged LightningModule.

This file sets the strategy up: options, the process groups, the model split and
the Lightning plumbing. Its hooks live beside it, one job per file:
:mod:`~lightning_pp.integration.step_hooks` (training, validation, test: a whole schedule
per step), :mod:`~lightning_pp.integration.predict_hooks` (streaming predict, generation)
and :mod:`~lightning_pp.integration.checkpoint_hooks` (sharded checkpoints).

Ranks form a ``(pp, dp, cp, tp)`` mesh laid out by :mod:`lightning_pp.distributed.topology`
(``tp`` fastest, ``pp`` slowest, so tensor-parallel peers are neighbours and a
pipeline stage is one block of ``dp * cp * tp`` ranks). Replicas are data
parallel: every rank of a replica reads the same batches, and gradients are
averaged over the replicas of each stage. Tensor- and context-parallel layers
(:mod:`lightning_pp.parallel.layers`) get their groups from
``strategy.topology``, which exists from ``configure_model`` on.
"""

from __future__ import annotations

import atexit
import gc
import weakref
from datetime import timedelta
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.distributed import (
    _all_gather_ddp_if_available,
    _init_dist_connection,
    _sync_ddp,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from lightning_pp.distributed.errors import named_failures
from lightning_pp.distributed.interrupts import install_interrupt_escalation
from lightning_pp.distributed.objects import barrier, broadcast_object
from lightning_pp.distributed.p2p import PipeComm, Transport
from lightning_pp.distributed.topology import MeshShape, build_topology
from lightning_pp.integration.checkpoint_hooks import CheckpointMixin
from lightning_pp.integration.predict_hooks import PredictMixin
from lightning_pp.integration.step_hooks import StepsMixin
from lightning_pp.integration.strategy_state import PipelineStrategyState
from lightning_pp.parallel.gradients import sync_found_inf
from lightning_pp.parallel.model_parallel import (
    counts_once,
    cp_partial_parameter_ids,
    pre_initialize_stage_fusion,
)
from lightning_pp.pipeline.balance import balance_by_time, profile_layer_times
from lightning_pp.pipeline.schedules import normalise_schedule_name
from lightning_pp.pipeline.stage import (
    capture_sequential_input,
    find_pipelined_sequential,
    partition_module,
)
from lightning_pp.platform import distributed_backend_for, platform_for
from lightning_pp.tracing.trace import StepTracer, TraceOptions

__all__ = ["PPStrategy"]


class PPStrategy(StepsMixin, PredictMixin, CheckpointMixin, PipelineStrategyState):
    """Pipeline-parallel training and inference of a LightningModule's ``nn.Sequential``.

    Args:
        pipeline_parallel_size: pipeline stages per replica; ``None`` uses every device
            left after the tensor/context-parallel axes (no data parallelism). The
            world size must be a multiple of ``pp * cp * tp``; the quotient is the
            number of data-parallel replicas.
        num_microbatches: microbatches per batch; ``None`` means ``2 * pipeline_parallel_size``.
            A batch with fewer rows uses one microbatch per row.
        schedule: ``"1F1B"`` (default), ``"GPipe"`` or ``"Interleaved1F1B"``.
        virtual_stages: stages per rank, for ``"Interleaved1F1B"`` (default 2 there, else 1).
        balance: layers per stage (length ``pp * virtual_stages``); default balances
            parameter counts; ``"time"`` profiles each layer's forward + backward on the
            device (needs ``balance_sample``) and minimises the slowest stage.
        balance_sample: one training batch, for ``balance="time"``.
        trace: a folder (or :class:`~lightning_pp.tracing.trace.TraceOptions`) to record a few
            training steps into: ``trace.json`` for chrome://tracing or Perfetto, one
            track per rank, and ``timeline.png`` with the measured bubble.
        sequential: attribute name of the ``nn.Sequential`` to pipeline, when the module
            has more than one.
        transport: the point-to-point mover (tests use one whose sends wait for receivers).
        process_group_backend: override the platform's backend.
        tensor_parallel_size: ranks that split each tensor-parallel layer of a stage
            (the mesh's ``tp`` axis); build such layers in ``configure_model`` from
            ``self.trainer.strategy.topology``.
        context_parallel_size: ranks that split each sequence's tokens (the ``cp``
            axis; attention gathers keys and values over it).
        attention_data_parallel_size: data-parallel attention (SGLang's "DP
            attention") for inference: the ``cp`` axis holds separate sequences per
            rank while the MLP stays split over ``cp x tp``. Excludes
            ``context_parallel_size``; not for training.
        fused_allreduce_max_tokens: the most rows one fused all-reduce + RMSNorm call
            may pass to a FlashInfer kernel (its workspace is sized for it, once,
            during setup); larger calls use the exact fallback.
        timeout: how long any collective or point-to-point transfer may wait for a peer
            before the job fails with an error naming the stage, the peer and the
            operation (a stalled or lost stage). ``None`` waits forever.
        check_finite_loss: stop every rank with an error naming the step when the loss
            is NaN or infinite (a pipeline cannot stop one stage alone without hanging
            the others).
    """

    strategy_name = "pp"

    def __init__(
        self,
        pipeline_parallel_size: Optional[int] = None,
        num_microbatches: Optional[int] = None,
        schedule: str = "1F1B",
        *,
        virtual_stages: Optional[int] = None,
        balance: Optional[Union[Sequence[int], str]] = None,
        balance_sample: Any = None,
        trace: Optional[Union[str, TraceOptions]] = None,
        sequential: Optional[str] = None,
        transport: Optional[Transport] = None,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = timedelta(minutes=30),
        check_finite_loss: bool = True,
        tensor_parallel_size: int = 1,
        context_parallel_size: int = 1,
        attention_data_parallel_size: int = 1,
        fused_allreduce_max_tokens: int = 2048,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.schedule_name = normalise_schedule_name(schedule)
        if pipeline_parallel_size is not None and pipeline_parallel_size < 1:
            raise ValueError(
                f"pipeline_parallel_size must be a positive number of stages, got {pipeline_parallel_size}."
            )
        if num_microbatches is not None and num_microbatches < 1:
            raise ValueError(f"num_microbatches must be at least 1, got {num_microbatches}.")
        if virtual_stages is None:
            virtual_stages = 2 if self.schedule_name == "interleaved1f1b" else 1
        if virtual_stages < 1:
            raise ValueError(f"virtual_stages must be at least 1, got {virtual_stages}.")
        if (virtual_stages > 1) != (self.schedule_name == "interleaved1f1b"):
            raise ValueError(
                f"virtual_stages={virtual_stages} does not fit schedule={schedule!r}: several stages per rank need "
                "schedule='Interleaved1F1B', and that schedule needs virtual_stages >= 2."
            )
        self._requested_pp_size = pipeline_parallel_size
        for name, size in (
            ("tensor_parallel_size", tensor_parallel_size),
            ("context_parallel_size", context_parallel_size),
            ("attention_data_parallel_size", attention_data_parallel_size),
            ("fused_allreduce_max_tokens", fused_allreduce_max_tokens),
        ):
            if size < 1:
                raise ValueError(f"{name} must be at least 1, got {size}.")
        if context_parallel_size > 1 and attention_data_parallel_size > 1:
            raise ValueError(
                "context_parallel_size and attention_data_parallel_size both use the mesh's cp axis: set one of them "
                "(context parallelism splits one sequence's tokens; data-parallel attention gives each rank its own "
                "sequences)."
            )
        self.tp_size = tensor_parallel_size
        self.cp_size = max(context_parallel_size, attention_data_parallel_size)
        #: How the ``cp`` axis is used: ``"context"`` or ``"data"`` (data-parallel attention).
        self.attention_mode = "data" if attention_data_parallel_size > 1 else "context"
        self.fused_allreduce_max_tokens = fused_allreduce_max_tokens
        if balance == "time" and self.tp_size * self.cp_size > 1:
            raise ValueError(
                "balance='time' profiles layers on one rank, but tensor/context-parallel layers need their whole "
                "group to run: pass balance as layer counts per stage instead."
            )
        self._requested_microbatches = num_microbatches
        self.virtual_stages = virtual_stages
        if isinstance(balance, str) and balance != "time":
            raise ValueError(f"balance={balance!r}: pass layer counts per stage, or 'time' to balance measured times.")
        if balance == "time" and balance_sample is None:
            raise ValueError("balance='time' profiles the layers on one batch: pass balance_sample=<a training batch>.")
        self.balance: Optional[Union[list[int], str]] = (
            balance if isinstance(balance, str) or balance is None else list(balance)
        )
        self._balance_sample = balance_sample
        self._trace_options = TraceOptions(trace) if isinstance(trace, str) else trace
        self._tracer = None
        self.sequential_name = sequential
        self._transport = transport
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self.check_finite_loss = check_finite_loss
        self._num_nodes = 1
        self.pp_size = 1
        self.dp_size = 1
        self.pp_rank = 0
        self.dp_rank = 0
        #: Every process group of the mesh (set up with the process group, before ``configure_model``).
        self.topology = None
        #: Whether each fused all-reduce of this stage uses FlashInfer's kernel (filled during setup).
        self.allreduce_fusion: dict[str, bool] = {}
        self._cp_partial_ids = frozenset()
        self._counted_in_norm = None
        self._replica_group = None
        self._pp_group = None
        self._pp_cpu_group = None
        self._dp_group = None
        self._pipelined = None
        self._pipelined_attr = ""
        self._pipelined_param_ids: frozenset[int] = frozenset()
        self._comm = None
        self._schedules = {}
        self._pending_grads = None

    # -- Lightning plumbing ------------------------------------------------------------
    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        # Lightning adds a distributed sampler and syncs `self.log(sync_dist=True)`
        # only for strategies that say so.
        return True

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every stage of a replica must see the same batches: split over replicas only.
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    def set_world_ranks(self) -> None:
        # Lightning calls this while building the Trainer: a bad layout fails there,
        # in the launching process, before any rank starts or blocks.
        self._check_layout(self.num_nodes * self.num_processes)
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank  # type: ignore[attr-defined]  # set on the function, as Lightning does

    def _check_layout(self, world_size: int) -> MeshShape:
        """The mesh shape for ``world_size`` ranks, or an error that says what to change."""
        inner = self.cp_size * self.tp_size
        if world_size and world_size % inner:
            raise ValueError(
                f"context/attention-data-parallel size {self.cp_size} x tensor_parallel_size {self.tp_size} = {inner} "
                f"does not divide the {world_size} processes (devices x nodes). Change those sizes or `devices`."
            )
        pp_size = self._requested_pp_size or max(world_size // inner, 1)
        if world_size and world_size % (pp_size * inner):
            what = f"pipeline_parallel_size={pp_size}" + (f" x {inner} (cp x tp)" if inner > 1 else "")
            raise ValueError(
                f"{what} does not divide the {world_size} processes (devices x nodes). "
                f"Use a divisor of {world_size // inner if world_size % inner == 0 else world_size}, "
                "or change `devices`/`num_nodes`."
            )
        dp_size = max(world_size // (pp_size * inner), 1)
        return MeshShape(pp=pp_size, dp=dp_size, cp=self.cp_size, tp=self.tp_size)

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._setup_distributed()
        # Ctrl-C must stop every rank even while this one is blocked waiting for a stalled peer.
        install_interrupt_escalation(self._stop_launched_ranks)

    def _stop_launched_ranks(self) -> None:
        """Kills the ranks Lightning's launcher started from this process (none under torchrun/SLURM)."""
        launcher = self.launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and getattr(launcher, "procs", None):
            launcher.kill(_get_sigkill_signal())

    def _setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        world_size = self.num_nodes * self.num_processes
        shape = self._check_layout(world_size)
        self.pp_size, self.dp_size = shape.pp, shape.dp
        platform = platform_for(self.root_device)
        backend = self._process_group_backend or platform.dist_backend
        assert self.cluster_environment is not None
        _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout)
        # NOTE: gloo groups still alive at interpreter shutdown can abort the process
        # (see _release_at_exit), with any backend: device groups have gloo CPU twins.
        atexit.register(_release_at_exit, weakref.ref(self))
        self.topology = topology = build_topology(shape, device_type=self.root_device.type)
        # The mesh's groups exist even for axes of size one (a ParallelGroup of one has none).
        self._pp_group, self._dp_group = topology.mesh.get_group("pp"), topology.mesh.get_group("dp")
        self.pp_rank, self.dp_rank = topology.coords.pp, topology.coords.dp
        # Small control messages (metadata, logged values) go over the CPU twin.
        self._pp_cpu_group = topology.pp.cpu_group if backend != distributed_backend_for("cpu") else None
        # The norm of the whole model adds up every rank of a replica, not just its pipeline.
        self._replica_group = topology.replica.device_group
        self._comm = PipeComm(
            self._pp_group,
            self.root_device,
            meta_group=self._pp_cpu_group,
            transport=self._transport,
            platform=platform,
            timeout=self._timeout,
        )

    def _release_process_groups(self) -> None:
        """Drops this strategy's references to its process groups (at exit: nothing communicates after)."""
        self._comm = None
        self._pp_group = self._dp_group = self._pp_cpu_group = self._replica_group = None
        self.topology = None

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        num_stages = self.pp_size * self.virtual_stages
        local_stages = [self.pp_rank + v * self.pp_size for v in range(self.virtual_stages)]
        if self.balance == "time":
            self.balance = self._balance_by_time(num_stages)
        assert not isinstance(self.balance, str), "balance='time' was replaced by measured counts above"
        self._pipelined_attr, self._pipelined = partition_module(
            self.module,
            name=self.sequential_name,
            num_stages=num_stages,
            local_stages=local_stages,
            balance=self.balance,
        )
        # Parameters outside the Sequential are copies held by every stage.
        self._pipelined_param_ids = frozenset(id(p) for p in self._pipelined.parameters())
        self._cp_partial_ids = cp_partial_parameter_ids(self._pipelined) if self.cp_size > 1 else frozenset()
        # Parameters outside the Sequential are copies on every stage, and tensor-parallel
        # stages hold copies and shards: each distinct tensor counts once in a global norm.
        pipelined_ids = self._pipelined_param_ids
        assert self.topology is not None
        self._counted_in_norm = counts_once(
            self._pipelined, self.topology, replicated_over_pipeline=lambda p: id(p) not in pipelined_ids
        )
        if trainer.state.fn == TrainerFn.FITTING and self.attention_mode == "data":
            raise ValueError(
                "attention_data_parallel_size is for inference (predict, generation): its ranks hold different "
                "sequences, so their attention gradients are not one model's. Train with data parallelism "
                "(more devices) or context_parallel_size instead."
            )
        if self._trace_options is not None and self._tracer is None:
            self._tracer = StepTracer(self._trace_options, self.global_rank, self.pp_rank, self.pp_size)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        # Before any step, graph capture or compile: creating a workspace runs collectives.
        self.allreduce_fusion = pre_initialize_stage_fusion(
            self._pipelined, max_num_tokens=self.fused_allreduce_max_tokens, dtype=self._activation_dtype()
        )
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            # Norm clipping must see the gradients of every stage, not just this rank's.
            self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]
        self.setup_precision_plugin()
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None:
            sync_found_inf(scaler)

    def _activation_dtype(self) -> torch.dtype:
        """The dtype the stage's fused all-reduces will see: the autocast dtype, else the parameters'."""
        autocast = getattr(self.precision_plugin, "_desired_input_dtype", None) or getattr(
            self.precision_plugin, "_desired_dtype", None
        )
        if isinstance(autocast, torch.dtype):
            return autocast
        param = next(iter(self._pipelined.parameters()), None) if self._pipelined is not None else None
        return param.dtype if param is not None else torch.get_default_dtype()

    def _balance_by_time(self, num_stages: int) -> list[int]:
        """Stage sizes from layer times measured on global rank 0, shared with every rank."""
        counts = None
        if self.global_rank == 0:
            module = self.module
            attr, sequential = find_pipelined_sequential(module, self.sequential_name)
            if not isinstance(sequential, nn.Sequential):
                raise RuntimeError(
                    f"balance='time' profiles an unsplit nn.Sequential, but {attr} is already split; "
                    "pass the measured balance (a list of layer counts) to reuse the split."
                )
            sample_input = capture_sequential_input(module, attr, self._balance_sample)
            counts = balance_by_time(profile_layer_times(sequential, sample_input, self.root_device), num_stages)
        return self.broadcast(counts, 0)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        self._refuse_sharded_checkpoint()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        self._refuse_sharded_checkpoint()
        return super().load_checkpoint(checkpoint_path, weights_only)

    def _refuse_sharded_checkpoint(self) -> None:
        # Tensor-parallel shards share their full tensor's name: saved by name, one
        # rank's shard would silently stand for all of them.
        if self.tp_size * self.cp_size > 1:
            raise NotImplementedError(
                f"Checkpoints of tensor/context-parallel stages (tp={self.tp_size}, cp={self.cp_size}) are not "
                "supported yet. Save the unsharded weights yourself (e.g. gather each block's shards), or train "
                "with tensor_parallel_size=1 and context_parallel_size=1 to checkpoint."
            )

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def teardown(self) -> None:
        # The process group stays up: `trainer.save_checkpoint` after `fit` still needs it.
        super().teardown()

    @override
    def on_exception(self, exception: BaseException) -> None:
        # Lightning's launcher kills the ranks it started only on Ctrl-C. After any other
        # error here a stalled rank would outlive the job (alive, never communicating,
        # so no peer's exit wakes it): a failed job takes every rank with it.
        self._stop_launched_ranks()

    # -- collectives ------------------------------------------------------------------------
    @override
    def barrier(self, name: Optional[str] = None) -> None:
        barrier(operation=f"pass the barrier {name!r}" if name else "pass a barrier", timeout=self._timeout)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        operation = f"broadcast an object from global rank {src}"
        return broadcast_object(obj, src=src, operation=operation, timeout=self._timeout)

    @override
    def reduce(
        self, tensor: Union[Tensor, Any], group: Optional[Any] = None, reduce_op: Optional[Union[str, Any]] = "mean"
    ) -> Union[Tensor, Any]:
        # Every stage of a replica holds the same logged value (sent from the last
        # stage), so a world-wide mean equals the mean over replicas.
        if not isinstance(tensor, Tensor) or not dist.is_initialized():
            return tensor
        with named_failures(f"reduce a logged value ({reduce_op}) over the replicas", group, timeout=self._timeout):
            return _sync_ddp(tensor, group=group, reduce_op=reduce_op)

    @override
    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        with named_failures("all-gather a tensor", group, timeout=self._timeout):
            return _all_gather_ddp_if_available(tensor, group=group, sync_grads=sync_grads)


def _release_at_exit(strategy_ref: "weakref.ref[PPStrategy]") -> None:
    """Destroys the process groups at exit, while the interpreter can still run their threads.

    NOTE: a gloo worker thread deletes a finished collective when it holds the last
    reference to it, or when it deletes a barrier that held a weak one (a barrier
    snapshots the collectives still in flight). Deleting it frees tensors created in
    Python, which takes the GIL; a thread that asks for the GIL once the interpreter
    is finalizing is ended by ``pthread_exit``, whose unwinding through the noexcept
    ``~AsyncWork`` calls ``std::terminate``: "terminate called without an active
    exception", SIGABRT. ``trainer.save_checkpoint`` (a broadcast, at once Lightning's
    barrier, then exit) hit it about one run in seven under CPU load.
    ``destroy_process_group`` alone keeps every group this strategy references alive,
    worker threads included; once the last reference is gone, ``~ProcessGroupGloo``
    joins them with the GIL released, so a pending deletion finishes here.
    """
    strategy = strategy_ref()
    if strategy is not None:
        strategy._release_process_groups()
        del strategy
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
