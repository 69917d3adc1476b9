"""``PPStrategy``: pipeline parallelism for an unchanged LightningModule.

How a training step runs (automatic optimization)::

    Lightning                         PPStrategy
    ---------                         ----------
    training_step(batch) ──────────▶  split batch into m microbatches; run the whole
                                      schedule (forwards *and* backwards); stash the
                                      new gradients; return the batch loss
    zero_grad()                       (wipes .grad -- our stash is safe)
    backward(loss) ────────────────▶  add the stashed gradients to .grad
    clip / optimizer.step()           global-norm clipping over all stages

Lightning zeroes gradients *between* ``training_step`` and ``backward``, so the
schedule cannot leave its gradients in ``.grad``; it cannot wait for ``backward``
either, because the step must return the loss that only the schedule computes.

Ranks form a ``(dp, pp)`` mesh: consecutive global ranks are the stages of one
pipeline replica, replicas are data parallel. Every stage of a replica reads the
same batches; gradients are averaged over the replicas of each stage.
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.distributed import _all_gather_ddp_if_available, _init_dist_connection, _sync_ddp
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh
from typing_extensions import override

from lightning_pp.checkpoint import (
    gather_param_group_names,
    indexed_to_named_optimizer_state,
    is_sharded_checkpoint,
    load_named_optimizer_state,
    load_sharded_checkpoint,
    named_optimizer_state,
    param_order_key,
    remove_checkpoint,
    save_sharded_checkpoint,
)
from lightning_pp.balance import balance_by_time, profile_layer_times
from lightning_pp.engine import PipelineExecutor
from lightning_pp.interrupts import install_interrupt_escalation
from lightning_pp.microbatch import batch_rows, split_microbatches
from lightning_pp.p2p import PipeComm, Transport
from lightning_pp.pipeline_module import (
    PipelinedSequential,
    capture_sequential_input,
    find_pipelined_sequential,
    partition_module,
)
from lightning_pp.platform import distributed_backend_for, platform_for
from lightning_pp.schedules import SCHEDULES, Schedule, build_schedule
from lightning_pp.trace import StepTracer, TraceOptions, TraceRecorder
from lightning_pp.step_outputs import LogRecorder, concat_outputs, extract_loss, weighted_mean

__all__ = ["PPStrategy"]


def _normalise_schedule_name(name: str) -> str:
    key = name.lower().replace("_", "").replace("-", "")
    if key not in SCHEDULES:
        raise ValueError(f"Unknown pipeline schedule {name!r}. Choose one of: {', '.join(SCHEDULES)}.")
    return key


class PPStrategy(ParallelStrategy):
    """Pipeline-parallel training and inference of a LightningModule's ``nn.Sequential``.

    Args:
        pipeline_parallel_size: pipeline stages per replica; ``None`` uses every device
            (no data parallelism). The world size must be a multiple of it; the
            quotient is the number of data-parallel replicas.
        num_microbatches: microbatches per batch; ``None`` means ``2 * pipeline_parallel_size``.
            A batch with fewer rows uses one microbatch per row.
        schedule: ``"1F1B"`` (default), ``"GPipe"`` or ``"Interleaved1F1B"``.
        virtual_stages: stages per rank, for ``"Interleaved1F1B"`` (default 2 there, else 1).
        balance: layers per stage (length ``pp * virtual_stages``); default balances
            parameter counts; ``"time"`` profiles each layer's forward + backward on the
            device (needs ``balance_sample``) and minimises the slowest stage.
        balance_sample: one training batch, for ``balance="time"``.
        trace: a folder (or :class:`~lightning_pp.trace.TraceOptions`) to record a few
            training steps into: ``trace.json`` for chrome://tracing or Perfetto, one
            track per rank, and ``timeline.png`` with the measured bubble.
        sequential: attribute name of the ``nn.Sequential`` to pipeline, when the module
            has more than one.
        transport: the point-to-point mover (tests use one whose sends wait for receivers).
        process_group_backend: override the platform's backend.
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
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.schedule_name = _normalise_schedule_name(schedule)
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
        self._tracer: Optional[StepTracer] = None
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
        self._pp_group: Optional[dist.ProcessGroup] = None
        self._pp_cpu_group: Optional[dist.ProcessGroup] = None
        self._dp_group: Optional[dist.ProcessGroup] = None
        self._pipelined: Optional[PipelinedSequential] = None
        self._pipelined_attr = ""
        self._comm: Optional[PipeComm] = None
        self._schedules: dict[tuple[int, bool], Schedule] = {}
        self._pending_grads: Optional[list[Optional[Tensor]]] = None

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

    @property
    def num_microbatches(self) -> int:
        return self._requested_microbatches or 2 * self.pp_size

    def set_world_ranks(self) -> None:
        # Lightning calls this while building the Trainer: a bad layout fails there,
        # in the launching process, before any rank starts or blocks.
        self._check_layout(self.num_nodes * self.num_processes)
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    def _check_layout(self, world_size: int) -> None:
        pp_size = self._requested_pp_size or world_size
        if world_size and world_size % pp_size:
            raise ValueError(
                f"pipeline_parallel_size={pp_size} does not divide the {world_size} processes (devices x nodes). "
                f"Use a divisor of {world_size}, or change `devices`/`num_nodes`."
            )

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
        self._check_layout(world_size)
        pp_size = self._requested_pp_size or world_size
        self.pp_size, self.dp_size = pp_size, world_size // pp_size
        platform = platform_for(self.root_device)
        backend = self._process_group_backend or platform.dist_backend
        assert self.cluster_environment is not None
        _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout)
        if backend == distributed_backend_for("cpu"):
            # NOTE: Lightning registers destroy_process_group at exit only for its GPU
            # backend; gloo ranks left to interpreter shutdown can abort.
            atexit.register(_destroy_process_group)
        mesh = init_device_mesh(self.root_device.type, (self.dp_size, self.pp_size), mesh_dim_names=("dp", "pp"))
        self._pp_group, self._dp_group = mesh.get_group("pp"), mesh.get_group("dp")
        self.pp_rank, self.dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
        if backend != distributed_backend_for("cpu"):
            # Small control messages (metadata, logged values) go over a CPU twin.
            pipelines = [list(range(d * pp_size, (d + 1) * pp_size)) for d in range(self.dp_size)]
            self._pp_cpu_group, _ = dist.new_subgroups_by_enumeration(pipelines, backend=distributed_backend_for("cpu"))
        self._comm = PipeComm(
            self._pp_group,
            self.root_device,
            meta_group=self._pp_cpu_group,
            transport=self._transport,
            platform=platform,
            timeout=self._timeout,
        )

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        num_stages = self.pp_size * self.virtual_stages
        local_stages = [self.pp_rank + v * self.pp_size for v in range(self.virtual_stages)]
        if self.balance == "time":
            self.balance = self._balance_by_time(num_stages)
        self._pipelined_attr, self._pipelined = partition_module(
            self.lightning_module,
            name=self.sequential_name,
            num_stages=num_stages,
            local_stages=local_stages,
            balance=self.balance,
        )
        if self._trace_options is not None and self._tracer is None:
            self._tracer = StepTracer(self._trace_options, self.global_rank, self.pp_rank, self.pp_size)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            # Norm clipping must see the gradients of every stage, not just this rank's.
            self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]
        self.setup_precision_plugin()
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None:
            _sync_found_inf(scaler)

    def _balance_by_time(self, num_stages: int) -> list[int]:
        """Stage sizes from layer times measured on global rank 0, shared with every rank."""
        counts = None
        if self.global_rank == 0:
            module = self.lightning_module
            attr, sequential = find_pipelined_sequential(module, self.sequential_name)
            sample_input = capture_sequential_input(module, attr, self._balance_sample)
            counts = balance_by_time(profile_layer_times(sequential, sample_input, self.root_device), num_stages)
        return self.broadcast(counts, 0)

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

    # -- checkpoints (the format lives in lightning_pp/checkpoint.py) -----------------------
    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Each rank reads only the layers it holds: the split must exist before loading.
        return True

    def _param_names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.lightning_module.named_parameters()}

    def _param_group_names(self) -> list[list[list[str]]]:
        """Every optimizer group's parameter names over the pipeline, in one-device order (collective)."""
        return gather_param_group_names(
            self.optimizers,
            self._param_names(),
            param_order_key(self.lightning_module, self._pipelined_attr),
            self._pp_cpu_group or self._pp_group,
        )

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        # Keyed by parameter name: indices differ from stage to stage and split to split.
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return named_optimizer_state(optimizer, self._param_names())

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Writes every stage's weights and optimizer state into the directory ``filepath`` (all ranks)."""
        if storage_options is not None:
            raise TypeError(
                "PPStrategy writes sharded checkpoints with torch.distributed.checkpoint and takes no storage_options."
            )
        path = self.broadcast(str(filepath))
        group_names = self._param_group_names() if "optimizer_states" in checkpoint else []
        save_sharded_checkpoint(
            path,
            checkpoint,
            param_group_names=group_names,
            extra_meta={"pipeline_parallel_size": self.pp_size, "world_size": self.world_size},
        )

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Reads this rank's stages from a PPStrategy checkpoint (any split) or a one-device checkpoint file."""
        path = self.broadcast(str(checkpoint_path))
        module = self.lightning_module
        names = self._param_names()
        local_names = [[names[id(p)] for g in opt.param_groups for p in g["params"]] for opt in self.optimizers]
        if os.path.isfile(path) and not is_sharded_checkpoint(path):
            # One-device Lightning checkpoint, or one made by consolidate_checkpoint.
            checkpoint = super().load_checkpoint(path, weights_only=weights_only)
            if self.optimizers and "optimizer_states" in checkpoint:
                saved = checkpoint.get("lightning_pp", {}).get("optimizer_param_names")
                group_names = saved or self._param_group_names()
                checkpoint["optimizer_states"] = [
                    indexed_to_named_optimizer_state(state, groups)
                    for state, groups in zip(checkpoint["optimizer_states"], group_names)
                ]
            return checkpoint
        return load_sharded_checkpoint(
            path,
            model_keys=list(module.state_dict()),
            optimizer_param_names=local_names,
            strict=module.strict_loading,
            weights_only=weights_only,
        )

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        module = self.lightning_module
        local = set(module.state_dict())
        # A consolidated checkpoint holds every stage: keep this rank's layers.
        module.load_state_dict({k: v for k, v in checkpoint["state_dict"].items() if k in local}, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        names = self._param_names()
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            load_named_optimizer_state(optimizer, state, names)
            _optimizer_to_device(optimizer, self.root_device)

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            remove_checkpoint(filepath)

    # -- collectives ------------------------------------------------------------------------
    @override
    def barrier(self, name: Optional[str] = None) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src)
        return holder[0]

    @override
    def reduce(
        self, tensor: Union[Tensor, Any], group: Optional[Any] = None, reduce_op: Optional[Union[str, Any]] = "mean"
    ) -> Union[Tensor, Any]:
        # Every stage of a replica holds the same logged value (sent from the last
        # stage), so a world-wide mean equals the mean over replicas.
        if not isinstance(tensor, Tensor) or not dist.is_initialized():
            return tensor
        return _sync_ddp(tensor, group=group, reduce_op=reduce_op)

    @override
    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        return _all_gather_ddp_if_available(tensor, group=group, sync_grads=sync_grads)

    # -- steps -----------------------------------------------------------------------------
    def _schedule(self, num_microbatches: int, forward_only: bool) -> Schedule:
        key = (num_microbatches, forward_only)
        if key not in self._schedules:
            self._schedules[key] = build_schedule(
                self.schedule_name,
                self.pp_size,
                num_microbatches,
                virtual_stages=self.virtual_stages,
                forward_only=forward_only,
            )
        return self._schedules[key]

    @contextmanager
    def _traced_step(self, schedule: Schedule) -> Iterator[Optional[TraceRecorder]]:
        if self._tracer is None:
            yield None
            return
        describe = {
            "schedule": schedule.name,
            "pp_size": schedule.pp_size,
            "num_microbatches": schedule.num_microbatches,
            "virtual_stages": schedule.virtual_stages,
            "dp_size": self.dp_size,
        }
        with self._tracer.step(describe) as recorder:
            yield recorder

    def _executor(self, schedule: Schedule) -> PipelineExecutor:
        assert self._pipelined is not None
        return PipelineExecutor(
            self._pipelined.stages,
            schedule,
            self.pp_rank,
            self._comm if self.pp_size > 1 else None,
            sequential_name=f"self.{self._pipelined_attr}",
        )

    @contextmanager
    def _microbatch_steps(self, hook: str, batch: Any, args: tuple, kwargs: dict) -> Iterator[tuple]:
        """Splits ``batch`` and yields ``(step_fn, weights, recorder)`` for the user's ``hook``."""
        module = self.lightning_module
        assert module is not None and self._pipelined is not None
        rows = batch_rows(batch)
        microbatches = split_microbatches(batch, min(self.num_microbatches, rows))
        weights = [batch_rows(mb) / rows for mb in microbatches]
        recorder = LogRecorder()
        user_step = getattr(module, hook)
        pipelined = self._pipelined

        def step_fn(k: int, call_sequential: Any) -> Any:
            recorder.start_microbatch()
            pipelined.handler = call_sequential
            try:
                return user_step(microbatches[k], *args, **kwargs)
            finally:
                pipelined.handler = None

        # Instance attributes shadow the methods: the user's `self.log` lands in the recorder.
        module.log, module.log_dict = recorder.log, recorder.log_dict  # type: ignore[method-assign]
        try:
            yield step_fn, weights, recorder
        finally:
            del module.log, module.log_dict

    def _publish(self, recorder: LogRecorder, weights: list[float], output: Any) -> Any:
        """Sends the last stage's combined output and logs to every stage, then logs them."""
        module = self.lightning_module
        assert module is not None
        is_last = self.pp_rank == self.pp_size - 1
        payload = None
        if is_last:
            logs = recorder.combined(weights)
            payload = _to_cpu((output, logs))
        if self.pp_size > 1:
            holder = [payload]
            group = self._pp_cpu_group or self._pp_group
            dist.broadcast_object_list(holder, src=dist.get_global_rank(group, self.pp_size - 1), group=group)
            payload = holder[0]
        output, logs = _to_device(payload, self.root_device)
        for name, (value, log_kwargs) in logs.items():
            module.log(name, value, **log_kwargs)
        return output

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch, rest = args[0], args[1:]
        trainer = self.lightning_module.trainer
        scaler = getattr(self.precision_plugin, "scaler", None)
        accumulate = trainer.accumulate_grad_batches
        params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        previous = [p.grad for p in params]
        for p in params:
            p.grad = None
        schedule = self._schedule(min(self.num_microbatches, batch_rows(batch)), forward_only=False)
        with self._traced_step(schedule) as tracer:
            with self.precision_plugin.train_step_context(), self._microbatch_steps(
                "training_step", batch, rest, kwargs
            ) as (step_fn, weights, recorder):

                def loss_fn(k: int, step_output: Any) -> Tensor:
                    # One device back-propagates mean(batch) / accumulate: each microbatch
                    # contributes its share of the rows.
                    loss = extract_loss(step_output) * (weights[k] / accumulate)
                    return scaler.scale(loss) if scaler is not None else loss

                executor = self._executor(schedule)
                executor.tracer = tracer
                results = executor.run(step_fn, loss_fn)
            output = None
            if results:
                output = weighted_mean([results[k] for k in range(len(weights))], weights)
                if isinstance(output, Tensor):
                    output = output.detach()
            waited_from = tracer.now() if tracer is not None else 0.0
            output = self._publish(recorder, weights, output)
            if tracer is not None:
                # Time every stage spends waiting for the loss and logs of the last stage.
                tracer.add_span("wait", waited_from, tracer.now())
        if self.check_finite_loss:
            self._raise_if_not_finite(extract_loss(output), trainer, args[1] if len(args) > 1 else None)
        new_grads = [p.grad for p in params]
        for p, grad in zip(params, previous):
            p.grad = grad
        self._pending_grads = self._reduce_gradients(params, new_grads)
        return output

    def _raise_if_not_finite(self, loss: Tensor, trainer: "pl.Trainer", batch_idx: Any) -> None:
        finite = torch.isfinite(loss.detach()).all().to(torch.int32).reshape(1)
        if self.dp_size > 1:
            # Every replica must stop together, or the healthy ones wait forever.
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self._dp_group)
        if not bool(finite.item()):
            raise FloatingPointError(
                f"The training loss is not finite (this replica: {loss.item()}) at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}, batch {batch_idx}). Every pipeline rank stops here. Lower the "
                "learning rate, clip gradients or check the data; PPStrategy(check_finite_loss=False) trains on."
            )

    @override
    def on_train_start(self) -> None:
        trainer = self.lightning_module.trainer
        self._check_same_on_pipeline("training batches per epoch", trainer.num_training_batches)

    @override
    def on_validation_start(self) -> None:
        trainer = self.lightning_module.trainer
        self._check_same_on_pipeline("validation batches", trainer.num_val_batches)

    def _check_same_on_pipeline(self, what: str, value: Any) -> None:
        """Fails on every rank when the stages of a pipeline would run different numbers of steps."""
        if self.pp_size == 1:
            return
        values: list[Any] = [None] * self.pp_size
        dist.all_gather_object(values, value, group=self._pp_cpu_group or self._pp_group)
        if any(v != values[0] for v in values):
            raise ValueError(
                f"The stages of one pipeline see different numbers of {what}: {values} (by pipeline rank). Every "
                "stage must iterate the same data: give each rank the same dataloader and let PPStrategy split it "
                "over data-parallel replicas."
            )

    def _reduce_gradients(self, params: list[Tensor], grads: list[Optional[Tensor]]) -> list[Optional[Tensor]]:
        """Averages over data-parallel replicas; sums parameters outside the Sequential over the pipeline."""
        assert self._pipelined is not None
        pipelined_ids = {id(p) for p in self._pipelined.parameters()}
        reduced = []
        for p, grad in zip(params, grads):
            shared = id(p) not in pipelined_ids
            if grad is None and (self.dp_size > 1 or (shared and self.pp_size > 1)):
                grad = torch.zeros_like(p)
            if grad is not None and shared and self.pp_size > 1:
                # Used by the first and/or last stage only: every rank holds a copy.
                dist.all_reduce(grad, group=self._pp_group)
            if grad is not None and self.dp_size > 1:
                dist.all_reduce(grad, group=self._dp_group)
                grad.div_(self.dp_size)
            reduced.append(grad)
        return reduced

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Any], *args: Any, **kwargs: Any) -> Tensor:
        """Adds the gradients the schedule computed in ``training_step`` to ``.grad``.

        The precision plugin's pre/post hooks still run, so ``on_before_backward`` and
        ``on_after_backward`` fire as on one device.
        """
        module = self.lightning_module
        assert module is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        params = [p for p in module.parameters() if p.requires_grad]
        for p, grad in zip(params, self._pending_grads or []):
            if grad is None:
                continue
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)
        self._pending_grads = None
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def _clip_grad_by_norm(self, optimizer: Any, clip_val: Union[int, float]) -> None:
        """``clip_grad_norm_`` with the norm taken over every stage's gradients."""
        assert self._pipelined is not None
        pipelined_ids = {id(p) for p in self._pipelined.parameters()}
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and (id(p) in pipelined_ids or self.pp_rank == 0)
        ]
        local = torch.zeros((), dtype=torch.float64, device=self.root_device)
        for grad in grads:
            local += grad.detach().double().pow(2).sum()
        if self.pp_size > 1:
            dist.all_reduce(local, group=self._pp_group)
        total_norm = local.sqrt()
        clip_coef = (float(clip_val) / (total_norm + 1e-6)).clamp(max=1.0)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(clip_coef.to(p.grad.dtype))

    def _eval_step(self, hook: str, args: tuple, kwargs: dict, combine: str) -> Any:
        batch, rest = args[0], args[1:]
        plugin = self.precision_plugin
        context = plugin.val_step_context() if hook != "predict_step" else plugin.predict_step_context()
        with context, self._microbatch_steps(hook, batch, rest, kwargs) as (step_fn, weights, recorder):
            results = self._executor(self._schedule(len(weights), forward_only=True)).run(step_fn)
        output = None
        outputs = [results[k] for k in sorted(results)]
        if outputs and all(o is not None for o in outputs):
            output = weighted_mean(outputs, weights) if combine == "mean" else concat_outputs(outputs)
        return self._publish(recorder, weights, output)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("validation_step", args, kwargs, combine="mean")

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("test_step", args, kwargs, combine="mean")

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        """Streams batches through the pipeline; returns batch ``k``'s output on each replica's first stage.

        Other stages return ``None`` (prediction writers are muted there). See
        :mod:`lightning_pp.prediction`.
        """
        if _drives_own_pipeline(self._lightning_module):
            # Generation runs its own loop over the stages (lightning_pp.generation).
            with self.precision_plugin.predict_step_context():
                return self.lightning_module.predict_step(*args, stage=self._generation_stage(), **kwargs)
        stream, batch_idx = self._predict_stream(args)
        if stream is None:
            return self._eval_step("predict_step", args, kwargs, combine="concat")
        with self.precision_plugin.predict_step_context():
            return stream.step(batch_idx)

    def _generation_stage(self) -> Any:
        """This rank's place in the pipeline, for modules that drive their own pipeline loop."""
        from lightning_pp.generation import StageContext

        assert self._comm is not None
        return StageContext(
            pp_rank=self.pp_rank,
            pp_size=self.pp_size,
            comm=self._comm if self.pp_size > 1 else None,
            device=self.root_device,
            platform=platform_for(self.root_device),
            control_group=self._pp_cpu_group if self._pp_cpu_group is not None else self._pp_group,
            first_stage_rank=self._comm.global_rank(0),
        )

    # -- streaming predict ------------------------------------------------------------------
    #: Stream predict batches across batch boundaries (``False``: one forward-only
    #: schedule per batch, the fill/drain bubble every batch; benchmarks compare both).
    _predict_streaming: bool = True
    _predict_streams: Optional[dict] = None
    _muted_writers: Optional[list] = None

    def _predict_feed(self, dataloader_idx: int) -> Any:
        """The read-ahead feed of predict dataloader ``dataloader_idx``, or ``None`` when not streaming."""
        from lightning_pp.prediction import PredictFeed

        module = self._lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is None or not trainer.predicting or self._predict_streams is None:
            return None
        combined = trainer.predict_loop._combined_loader
        if combined is None or not 0 <= dataloader_idx < len(combined.flattened):
            return None
        feed = combined.flattened[dataloader_idx]
        return feed if isinstance(feed, PredictFeed) else None

    def _predict_stream(self, args: tuple) -> tuple[Any, int]:
        """The stream for this ``predict_step`` call (created on a dataloader's first batch), and the batch index."""
        from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

        from lightning_pp.prediction import PredictStream

        module = self.lightning_module
        assert module is not None and self._pipelined is not None and self._predict_streams is not None
        trainer = module.trainer
        combined = trainer.predict_loop._combined_loader
        multiple = combined is not None and len(combined.flattened) > 1
        takes_batch_idx = is_param_in_hook_signature(module.predict_step, "batch_idx", min_args=2)
        rest = args[1:]
        dataloader_idx = int(rest[-1]) if multiple and rest else 0
        feed = self._predict_feed(dataloader_idx)
        if feed is None:
            return None, 0
        stream = self._predict_streams.get(dataloader_idx)
        if stream is None or stream.feed is not feed:
            feed.limit = trainer.predict_loop.max_batches[dataloader_idx]
            tail = (dataloader_idx,) if multiple else ()

            def step_args(k: int) -> tuple:
                return ((k,) if takes_batch_idx else ()) + tail

            def prepare(batch: Any) -> Any:
                batch = self.precision_plugin.convert_input(batch)
                return module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)

            stream = PredictStream(
                feed,
                stage=self._pipelined.stages[self.pp_rank],
                pipelined=self._pipelined,
                user_step=module.predict_step,
                step_args=step_args,
                prepare=prepare,
                num_microbatches=self.num_microbatches,
                pp_rank=self.pp_rank,
                pp_size=self.pp_size,
                comm=self._comm if self.pp_size > 1 else None,
                device=self.root_device,
                platform=platform_for(self.root_device),
                sequential_name=f"self.{self._pipelined_attr}",
            )
            self._predict_streams[dataloader_idx] = stream
        batch_idx = int(rest[0]) if takes_batch_idx else stream.next_batch
        return stream, batch_idx

    @override
    def process_dataloader(self, dataloader: object) -> object:
        from lightning_pp.prediction import PredictFeed

        module = self._lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if _drives_own_pipeline(module):
            return dataloader
        if self._predict_streaming and self.virtual_stages == 1 and trainer is not None and trainer.predicting:
            return PredictFeed(dataloader)
        return super().process_dataloader(dataloader)

    @override
    def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
        if self._predict_feed(dataloader_idx) is not None or _drives_own_pipeline(self._lightning_module):
            # Deferred host-to-device copy: the pipeline copies each microbatch when it
            # launches, from pinned memory where the platform can do so asynchronously.
            return batch
        return super().batch_to_device(batch, device, dataloader_idx)

    @override
    def on_predict_start(self) -> None:
        from lightning_pp.prediction import mute_prediction_writers

        self._predict_streams = {}
        if self.pp_rank != 0:
            # Only the first stage of a replica holds its predictions.
            self._muted_writers = mute_prediction_writers(self.lightning_module.trainer.callbacks)

    @override
    def on_predict_end(self) -> None:
        from lightning_pp.prediction import unmute_prediction_writers

        unmute_prediction_writers(self._muted_writers or [])
        self._muted_writers = None
        for stream in (self._predict_streams or {}).values():
            stream.close()
        self._predict_streams = None
        if self.dp_size > 1:
            self._gather_replica_predictions()

    def _gather_replica_predictions(self) -> None:
        """Global rank 0 gets every replica's predictions, as one device would return them."""
        from lightning_pp.prediction import gather_replica_predictions

        loop = self.lightning_module.trainer.predict_loop
        if not loop.return_predictions:
            return
        combined = loop._combined_loader
        per_loader = []
        for i, predictions in enumerate(loop._predictions):
            sampler = getattr(combined.flattened[i], "batch_sampler", None) if combined is not None else None
            indices = list(getattr(sampler, "seen_batch_indices", []))[: len(predictions)]
            per_loader.append((list(predictions), indices, getattr(sampler, "batch_size", None)))
        payload = per_loader if self.pp_rank == 0 else None
        gathered: Optional[list[Any]] = [None] * dist.get_world_size() if self.global_rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        if gathered is None:
            return
        replicas = [gathered[d * self.pp_size] for d in range(self.dp_size)]
        for i, predictions in enumerate(loop._predictions):
            merged = gather_replica_predictions(
                [(replica[i][0], replica[i][1]) for replica in replicas], per_loader[i][2]
            )
            if merged is None:
                merged = [batch for replica in replicas for batch in replica[i][0]]
            # In place: the loop already handed this list to `trainer.predict` as its result.
            predictions[:] = merged


def _drives_own_pipeline(module: Any) -> bool:
    """A module (e.g. ``GenerationModule``) whose ``predict_step`` runs the stages itself."""
    trainer = getattr(module, "_trainer", None) if module is not None else None
    return bool(getattr(module, "drives_own_pipeline", False)) and trainer is not None and trainer.predicting


def _to_cpu(obj: Any) -> Any:
    return move_data_to_device(obj, torch.device("cpu"))


def _to_device(obj: Any, device: torch.device) -> Any:
    return move_data_to_device(obj, device)


def _sync_found_inf(scaler: Any) -> None:
    """Makes every rank skip (or take) an fp16 optimizer step together.

    NOTE: ``GradScaler.unscale_`` looks for inf/NaN only in this rank's gradients.
    One stage skipping a step that another takes would split the model, and their
    loss scales would drift apart; so the finding is all-reduced (max) over the world.
    """
    if getattr(scaler.unscale_, "_lightning_pp_synced", False):
        return
    unscale = scaler.unscale_

    def unscale_(optimizer: Any) -> None:
        unscale(optimizer)
        for found_inf in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)

    unscale_._lightning_pp_synced = True  # type: ignore[attr-defined]
    scaler.unscale_ = unscale_


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
