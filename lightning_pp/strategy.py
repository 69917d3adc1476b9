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
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.distributed import _all_gather_ddp_if_available, _init_dist_connection, _sync_ddp
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh
from typing_extensions import override

from lightning_pp.balance import balance_by_time, profile_layer_times
from lightning_pp.engine import PipelineExecutor
from lightning_pp.gradients import clip_grad_norm_across_stages, reduce_stage_gradients, sync_found_inf
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
from lightning_pp.strategy_checkpoint import CheckpointMixin
from lightning_pp.strategy_predict import PredictMixin
from lightning_pp.step_outputs import LogRecorder, concat_outputs, extract_loss, weighted_mean

__all__ = ["PPStrategy"]


def _normalise_schedule_name(name: str) -> str:
    key = name.lower().replace("_", "").replace("-", "")
    if key not in SCHEDULES:
        raise ValueError(f"Unknown pipeline schedule {name!r}. Choose one of: {', '.join(SCHEDULES)}.")
    return key


class PPStrategy(PredictMixin, CheckpointMixin, ParallelStrategy):
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
        self._pipelined_param_ids: frozenset[int] = frozenset()
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
        # Parameters outside the Sequential are copies held by every stage.
        self._pipelined_param_ids = frozenset(id(p) for p in self._pipelined.parameters())
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
            sync_found_inf(scaler)

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

    def _split(self, batch: Any) -> tuple[list[Any], list[float]]:
        """The batch's microbatches (one per row at most) and each one's share of the rows."""
        rows = batch_rows(batch)
        microbatches = split_microbatches(batch, min(self.num_microbatches, rows))
        return microbatches, [batch_rows(mb) / rows for mb in microbatches]

    @contextmanager
    def _microbatch_steps(self, hook: str, microbatches: list[Any], args: tuple, kwargs: dict) -> Iterator[tuple]:
        """Yields ``(step_fn, recorder)`` running the user's ``hook`` on each microbatch."""
        module = self.lightning_module
        assert module is not None and self._pipelined is not None
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
            yield step_fn, recorder
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
        microbatches, weights = self._split(batch)
        schedule = self._schedule(len(microbatches), forward_only=False)
        with self._traced_step(schedule) as tracer:
            with self.precision_plugin.train_step_context(), self._microbatch_steps(
                "training_step", microbatches, rest, kwargs
            ) as (step_fn, recorder):

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
        return reduce_stage_gradients(
            params,
            grads,
            shared=lambda p: id(p) not in self._pipelined_param_ids,
            pp_group=self._pp_group,
            pp_size=self.pp_size,
            dp_group=self._dp_group,
            dp_size=self.dp_size,
        )

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
        clip_grad_norm_across_stages(
            optimizer.param_groups,
            clip_val,
            # Parameters outside the Sequential are copies on every stage: count them once.
            counted=lambda p: id(p) in self._pipelined_param_ids or self.pp_rank == 0,
            pp_group=self._pp_group,
            pp_size=self.pp_size,
            device=self.root_device,
        )

    def _eval_step(self, hook: str, args: tuple, kwargs: dict, combine: str) -> Any:
        batch, rest = args[0], args[1:]
        plugin = self.precision_plugin
        context = plugin.val_step_context() if hook != "predict_step" else plugin.predict_step_context()
        microbatches, weights = self._split(batch)
        with context, self._microbatch_steps(hook, microbatches, rest, kwargs) as (step_fn, recorder):
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


def _to_cpu(obj: Any) -> Any:
    return move_data_to_device(obj, torch.device("cpu"))


def _to_device(obj: Any, device: torch.device) -> Any:
    return move_data_to_device(obj, device)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
