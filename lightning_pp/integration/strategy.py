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
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Generator, Optional, Sequence, Union

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
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from typing_extensions import override

from lightning_pp.checkpoint.hf import checkpoint_covers, load_pending_hf_checkpoints
from lightning_pp.distributed.errors import named_failures
from lightning_pp.distributed.interrupts import install_interrupt_escalation
from lightning_pp.distributed.objects import all_gather_int, barrier, broadcast_object
from lightning_pp.distributed.p2p import PipeComm, Transport
from lightning_pp.distributed.startup import set_default_group_timeout, startup_timeout
from lightning_pp.distributed.topology import (
    MeshShape,
    RankCoords,
    RankTopology,
    build_topology,
    destroy_groups,
    destroy_topology,
    rank_of,
)
from lightning_pp.integration.callback_checks import check_callbacks
from lightning_pp.integration.checkpoint_hooks import CheckpointMixin
from lightning_pp.integration.launcher import PipelineLauncher
from lightning_pp.integration.predict_hooks import PredictMixin
from lightning_pp.integration.sigterm import SigtermAgreement
from lightning_pp.integration.stage_sizes import (
    counted_parameters,
    prints_model_summary,
    stage_sizes_message,
)
from lightning_pp.integration.step_hooks import StepsMixin
from lightning_pp.integration.strategy_state import PipelineStrategyState
from lightning_pp.parallel.gradients import sync_found_inf
from lightning_pp.parallel.model_parallel import (
    counts_once,
    cp_partial_parameter_ids,
    pre_initialize_stage_fusion,
)
from lightning_pp.pipeline.balance import balance_by_time, profile_layer_times
from lightning_pp.pipeline.block_stage import partition_block_list, plan_block_split
from lightning_pp.pipeline.materialize import has_meta_tensors, materialize_meta_tensors
from lightning_pp.pipeline.microbatch import MicrobatchWeight, resolve_microbatch_weight
from lightning_pp.pipeline.schedules import normalise_schedule_name
from lightning_pp.pipeline.stage import (
    capture_sequential_input,
    find_pipelined_sequential,
    partition_module,
    plan_module_split,
    uses_block_list,
)
from lightning_pp.pipeline.ties import TiedParameter, check_tied_copies
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
        schedule: ``"1F1B"`` (default), ``"GPipe"``, ``"Interleaved1F1B"`` or ``"ZBH1"`` (zero-bubble:
            backward split into input and weight gradients, 1F1B's memory, a third of its bubble).
        virtual_stages: stages per rank, for ``"Interleaved1F1B"`` (default 2 there, else 1).
        balance: layers per stage (length ``pp * virtual_stages``); default balances
            parameter counts; ``"time"`` profiles each layer's forward + backward on the
            device (needs ``balance_sample``) and minimises the slowest stage.
        balance_sample: one training batch, for ``balance="time"``.
        trace: a folder (or :class:`~lightning_pp.tracing.trace.TraceOptions`) to record a few
            training steps into: ``trace.json`` for chrome://tracing or Perfetto, one
            track per rank, and ``timeline.png`` with the measured bubble.
        sequential: what to pipeline, when the default choice is not it: the attribute
            name of a direct ``nn.Sequential`` child, or the dotted path of a block list
            (``"model.model.layers"``). By default a direct ``nn.Sequential`` child, else
            a Hugging Face model's ``base_model_pp_plan``, else the largest list of
            same-class blocks (see :mod:`lightning_pp.pipeline.blocks`).
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
            operation (a stalled or lost stage). It bounds every process group the
            strategy creates and the streaming predict and generation loops. ``None``
            uses torch's default for the backend (30 minutes on gloo, 10 on NCCL). The
            start-up rendezvous, which waits for every rank to start, may take at least
            10 minutes (:mod:`lightning_pp.distributed.startup`).
        check_finite_loss: stop every rank with an error naming the step when the loss
            is NaN or infinite (a pipeline cannot stop one stage alone without hanging
            the others).
        microbatch_weight: how much each microbatch's loss (and each value logged with
            the default mean) counts in the batch's, in training, validation and test.
            ``None``: its rows, which gives one device's value for a per-row mean.
            ``"label_tokens"``: the tokens of ``batch["labels"]`` other than -100 after
            each row's first, which gives one device's value for a Hugging Face causal
            LM's loss (a mean over those tokens) when rows have different numbers of them
            (padding, masked prompts). Or a function of a microbatch (the batch's
            structure) returning the number of items its loss averages over.
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
        microbatch_weight: MicrobatchWeight = None,
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
        self._microbatch_weight = resolve_microbatch_weight(microbatch_weight)
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
        self._blocks = None
        self._pipelined_attr = ""
        self._pipelined_param_ids: frozenset[int] = frozenset()
        self._comm = None
        self._schedules = {}
        self._pending_grads = None
        self._outside_param_ids = frozenset()
        self._tied_parameters = []
        self._tie_groups = {}
        self._tied_names = {}

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
        # Lightning adds a distributed sampler and syncs `self.log(sync_dist=True)` only
        # for strategies that say so. Data is distributed over the replicas alone: with
        # one replica every stage reads the user's loader, in the user's order (a
        # DistributedSampler would reshuffle a shuffle=False loader), and a logged
        # value is already the one-device value on every stage.
        return self.dp_size > 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every stage of a replica must see the same batches: split over replicas only.
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    def set_world_ranks(self) -> None:
        # Lightning calls this while building the Trainer: a bad layout fails there,
        # in the launching process, before any rank starts or blocks.
        shape = self._check_layout(self.num_nodes * self.num_processes)
        self.pp_size, self.dp_size = shape.pp, shape.dp
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
        self._launcher = PipelineLauncher(
            self.cluster_environment,
            self.num_processes,
            self.num_nodes,
            check_before_launch=self._check_before_launch,
        )

    def _check_before_launch(self, trainer: Optional["pl.Trainer"], args: tuple) -> None:
        """Raises, in the launching process before any other rank starts, what every rank would raise in setup."""
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if trainer is not None:
            check_callbacks(getattr(trainer, "callbacks", []), pp_size=self.pp_size, fitting=fitting)
        module = args[0] if args and isinstance(args[0], pl.LightningModule) else None
        if module is None:
            return
        self._check_module(module, fitting=fitting)
        if is_overridden("configure_model", module) or self.balance == "time":
            return  # the network (or the split) exists only once set up on each rank
        plan = plan_block_split if uses_block_list(module, self.sequential_name) else plan_module_split
        plan(
            module,
            name=self.sequential_name,
            num_stages=self.pp_size * self.virtual_stages,
            balance=self.balance if not isinstance(self.balance, str) else None,
        )

    @staticmethod
    def _check_module(module: "pl.LightningModule", *, fitting: bool) -> None:
        if fitting and not module.automatic_optimization:
            raise MisconfigurationException(
                f"PPStrategy does not support manual optimization ({type(module).__name__}.automatic_optimization "
                "is False): each training step runs the whole pipeline schedule, every microbatch's forward and "
                "backward, inside training_step, so there is no loss left for manual_backward and no point at "
                "which your optimizer calls could run. Use automatic optimization (return the loss from "
                "training_step); gradient clipping, accumulation and LR schedulers work there."
            )

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

    #: The default group the topology was built under (weakly: a destroyed and
    #: re-initialised default group means every group of the topology is gone).
    _topology_world: Optional["weakref.ref[Any]"] = None
    #: What the topology was built for: mesh shape, device type, backend, timeout.
    _topology_key: Optional[tuple] = None
    _exit_hook_registered: bool = False

    def _setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        world_size = self.num_nodes * self.num_processes
        shape = self._check_layout(world_size)
        self.pp_size, self.dp_size = shape.pp, shape.dp
        platform = platform_for(self.root_device)
        backend = self._process_group_backend or platform.dist_backend
        assert self.cluster_environment is not None
        created = not dist.is_initialized()
        # The rendezvous waits for every rank to start and import: it gets a start-up
        # allowance, and the default group the strategy's deadline once all are there.
        _init_dist_connection(self.cluster_environment, backend, timeout=startup_timeout(self._timeout))
        if created:
            set_default_group_timeout(self._timeout)
        if not self._exit_hook_registered:
            # NOTE: gloo groups still alive at interpreter shutdown can abort the process
            # (see _release_at_exit), with any backend: device groups have gloo CPU twins.
            atexit.register(_release_at_exit, weakref.ref(self))
            self._exit_hook_registered = True
        self.topology = topology = self._reuse_or_build_topology(shape, backend)
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

    def _reuse_or_build_topology(self, shape: MeshShape, backend: str) -> RankTopology:
        """The process groups for ``shape``: those of an earlier fit/validate/predict when they still fit.

        Lightning calls ``setup_environment`` for every ``fit``, ``validate``,
        ``test`` and ``predict``; building the mesh each time added its groups again
        (4, 7, 10 groups over fit, validate, fit at pp=2), each holding communicators
        (device memory on GPUs). Every rank takes the same branch at the same point,
        which keeps group creation and destruction collective.
        """
        key = (shape, self.root_device.type, backend, self._timeout)
        old, world = self.topology, self._topology_world
        if old is not None and self._topology_key == key and world is not None and world() is dist.group.WORLD:
            return old
        if old is not None:
            # A different layout replaces it (with a new default group, its groups are already gone).
            tie_groups = list(self._tie_groups.values())
            self._release_process_groups()
            destroy_groups(tie_groups)
            destroy_topology(old)
        topology = build_topology(shape, device_type=self.root_device.type, timeout=self._timeout)
        self._topology_key, self._topology_world = key, weakref.ref(dist.group.WORLD)
        return topology

    def _release_process_groups(self) -> None:
        """Drops this strategy's references to its process groups (at exit: nothing communicates after)."""
        self._comm = None
        self._pp_group = self._dp_group = self._pp_cpu_group = self._replica_group = None
        self.topology = None
        self._topology_key = self._topology_world = None
        self._tie_groups, self._tied_parameters = {}, []

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.accelerator is not None and self.model is not None
        self._sigterm = None
        if self.topology is not None and self.world_size > 1:
            # Before Lightning registers its SIGTERM handler (right after this hook).
            self._sigterm = SigtermAgreement(trainer, self.topology.world_cpu, self._timeout)
            self._sigterm.install_handler()
        fitting = trainer.state.fn == TrainerFn.FITTING
        # Again on every rank: callbacks from configure_callbacks, ranks started by torchrun.
        check_callbacks(getattr(trainer, "callbacks", []), pp_size=self.pp_size, fitting=fitting)
        self._check_module(self.module, fitting=fitting)
        if self.dp_size == 1:
            # With one replica every stage logs the one-device value already (sent from the
            # last stage); Lightning's advice to add sync_dist=True does not apply.
            warnings.filterwarnings("ignore", message=_SYNC_DIST_ADVICE, category=PossibleUserWarning)
        self.accelerator.setup(trainer)
        num_stages = self.pp_size * self.virtual_stages
        local_stages = self._local_stages()
        block_list = uses_block_list(self.module, self.sequential_name)
        if self.balance == "time" and block_list:
            raise ValueError(
                "balance='time' profiles the layers of an nn.Sequential one at a time; a block list's blocks need the "
                "model's own loop. Pass balance=[blocks per stage] (by default stages get equal parameter counts)."
            )
        if self.balance == "time":
            self.balance = self._balance_by_time(num_stages)
        assert not isinstance(self.balance, str), "balance='time' was replaced by measured counts above"
        if block_list:
            self._blocks = partition_block_list(
                self.module,
                name=self.sequential_name,
                num_stages=num_stages,
                local_stages=local_stages,
                balance=self.balance,
            )
            self._pipelined_attr, self._pipelined = self._blocks.path, None
        else:
            self._pipelined_attr, self._pipelined = partition_module(
                self.module,
                name=self.sequential_name,
                num_stages=num_stages,
                local_stages=local_stages,
                balance=self.balance,
            )
            self._blocks = None
        materialized = self._materialize_stage()
        self._pipelined_param_ids = frozenset(id(p) for p in self._stage_parameters())
        # Parameters the module uses outside the Sequential are copies held by every stage
        # (also one a layer of the Sequential shares, e.g. a head tied to layer 0). A block
        # list's outside modules live on one stage each: only parameters registered directly
        # on an ancestor of the blocks are left on every stage.
        prefixes: tuple[str, ...] = (self._pipelined_attr + ".",)
        if self._blocks is not None:
            prefixes += tuple(path + "." for path in self._blocks.placed)
        self._outside_param_ids = frozenset(
            id(p) for name, p in self.module.named_parameters(remove_duplicate=False) if not name.startswith(prefixes)
        )
        self._tied_parameters = self._tied_parameter_groups()
        if materialized is not None:
            self._sync_materialized(materialized)
        stage_module = self._stage_module()
        self._cp_partial_ids = cp_partial_parameter_ids(stage_module) if self.cp_size > 1 else frozenset()
        # Copies over the pipeline (outside the Sequential, or tied across stages) and the
        # shards and copies of tensor-parallel stages: each distinct tensor counts once in a
        # global norm, a tied one on the first stage that holds it.
        outside_ids = self._outside_param_ids
        counted_elsewhere = frozenset(id(p) for p, _, first in self._tied_parameters if not first)
        assert self.topology is not None
        self._counted_in_norm = counts_once(
            stage_module,
            self.topology,
            replicated_over_pipeline=lambda p: id(p) in outside_ids,
            counted_elsewhere=lambda p: id(p) in counted_elsewhere,
        )
        summarised = prints_model_summary(getattr(trainer, "callbacks", []))
        if trainer.state.fn == TrainerFn.FITTING and self.pp_size > 1 and summarised:
            # Every rank's trainer has the same callbacks: all take part in the gather.
            counts = all_gather_int(
                counted_parameters(self.module, self._counted_in_norm),
                self.topology.world_cpu,
                operation="count the parameters of every pipeline stage",
                timeout=self._timeout,
            )
            rank_zero_info(
                stage_sizes_message(counts, self.topology.shape, shared_outside=bool(self._outside_param_ids))
            )
        if trainer.state.fn == TrainerFn.FITTING and self.attention_mode == "data":
            raise ValueError(
                "attention_data_parallel_size is for inference (predict, generation): its ranks hold different "
                "sequences, so their attention gradients are not one model's. Train with data parallelism "
                "(more devices) or context_parallel_size instead."
            )
        if self._trace_options is not None and self._tracer is None:
            assert self.topology is not None
            shape = self.topology.shape
            replica_0 = [rank_of(RankCoords(pp=p, dp=0, cp=0, tp=0), shape) for p in range(self.pp_size)]
            self._tracer = StepTracer(self._trace_options, self.global_rank, self.pp_rank, replica_0)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        # Before any step, graph capture or compile: creating a workspace runs collectives.
        self.allreduce_fusion = pre_initialize_stage_fusion(
            stage_module, max_num_tokens=self.fused_allreduce_max_tokens, dtype=self._activation_dtype()
        )
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            # Norm clipping must see the gradients of every stage, not just this rank's.
            self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]
        self.setup_precision_plugin()
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None:
            sync_found_inf(scaler)

    def _stage_module(self) -> nn.Module:
        """The module holding this rank's stages: the pipelined Sequential, or the block list."""
        if self._blocks is not None:
            return self._blocks.container
        assert self._pipelined is not None
        return self._pipelined

    def _stage_parameters(self) -> list[nn.Parameter]:
        """The parameters of this rank's stages."""
        if self._blocks is not None:
            return list(self._blocks.parameters())
        return list(self._pipelined.parameters()) if self._pipelined is not None else []

    def _tied_parameter_groups(self) -> list[tuple[Tensor, dist.ProcessGroup, bool]]:
        """This rank's copies of weights tied across stages: ``(copy, group of its holders, first holder?)``.

        Each tie gets one group per replica (its holders' data-, context- and
        tensor-parallel coordinates match), created by every rank in the same order,
        once per layout (kept with the topology's groups).
        """
        assert self.topology is not None
        shape = self.topology.shape
        self._tied_names = {}
        if self._blocks is not None:
            prefix = ""
            ties, named = self._blocks.ties, dict(self.module.named_parameters(remove_duplicate=False))

            def local_name(tie: TiedParameter) -> str:
                return tie.held_name(named)

        else:
            assert self._pipelined is not None
            prefix = self._pipelined_attr + "."
            local_layers = [i for indices in self._pipelined.stage_slices.values() for i in indices]
            ties, named = self._pipelined.ties, dict(self._pipelined.named_parameters(remove_duplicate=False))

            def local_name(tie: TiedParameter) -> str:
                return tie.local_name(local_layers)

        mine: list[tuple[Tensor, dist.ProcessGroup, bool]] = []
        for tie in ties:
            pp_ranks = sorted({stage % self.pp_size for stage in tie.stages})
            if len(pp_ranks) == 1:
                continue  # interleaved stages of one rank: one copy, nothing to sum
            for dp in range(shape.dp):
                for cp in range(shape.cp):
                    for tp in range(shape.tp):
                        ranks = tuple(rank_of(RankCoords(pp=p, dp=dp, cp=cp, tp=tp), shape) for p in pp_ranks)
                        group = self._tie_groups.get(ranks)
                        if group is None:
                            group = self._tie_groups[ranks] = dist.new_group(list(ranks), timeout=self._timeout)
                        if self.global_rank in ranks:
                            param = named[local_name(tie)]
                            mine.append((param, group, self.global_rank == ranks[0]))
                            self._tied_names[id(param)] = prefix + tie.names[0]
        # Every holder sees every copy's shape and dtype, so all of them refuse a tie that cannot be kept.
        for held, group, _ in mine:
            copies: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(copies, (self.global_rank, tuple(held.shape), str(held.dtype)), group=group)
            check_tied_copies(self._tied_names[id(held)], copies)
        return mine

    def _materialize_stage(self) -> Optional[list[str]]:
        """Allocates and initialises (or reads from a pending checkpoint) this rank's meta-device tensors.

        Returns the names of the tensors initialised here (not read), which replicas
        and tie holders must then agree on; ``None`` when nothing was on the meta device.
        """
        module = self.module
        if not has_meta_tensors(module):
            return None
        where = f"pipeline stage {', '.join(str(s) for s in self._local_stages())} (global rank {self.global_rank})"
        initialised = materialize_meta_tensors(module, self.root_device, loaded=checkpoint_covers(module))
        load_pending_hf_checkpoints(module, where=where)
        return initialised

    def _local_stages(self) -> list[int]:
        return [self.pp_rank + v * self.pp_size for v in range(self.virtual_stages)]

    def _sync_materialized(self, initialised: list[str]) -> None:
        """Makes freshly initialised tensors agree: over data-parallel replicas, and over the holders of a tie.

        Every rank initialised its stage with its own random numbers; replicas of a
        stage must start equal (DDP broadcasts rank 0's module the same way), and so must
        the copies of a weight tied across stages.
        """
        names = set(initialised)
        if self.dp_size > 1 and self._dp_group is not None:
            src = dist.get_global_rank(self._dp_group, 0)
            for name, tensor in sorted(self.module.state_dict(keep_vars=True).items()):
                if name in names:
                    with named_failures("agree on the initial weights over the data-parallel replicas", self._dp_group):
                        dist.broadcast(tensor.data, src=src, group=self._dp_group)
        for param, group, _ in self._tied_parameters:  # the same order on every holder
            with named_failures("agree on the initial value of a weight tied across stages", group):
                dist.broadcast(param.data, src=dist.get_global_rank(group, 0), group=group)

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Generator[None, None, None]:
        """``trainer.init_module(empty_init=True)`` builds on the meta device; each rank materialises its stage.

        The split happens in ``setup``: a rank then allocates and initialises only
        its own stage's tensors (or reads them, see
        :func:`lightning_pp.checkpoint.load_hf_checkpoint`), never the whole model.
        """
        device = torch.device("meta") if empty_init else nullcontext()
        with device, self.precision_plugin.tensor_init_context():
            yield

    def _activation_dtype(self) -> torch.dtype:
        """The dtype the stage's fused all-reduces will see: the autocast dtype, else the parameters'."""
        autocast = getattr(self.precision_plugin, "_desired_input_dtype", None) or getattr(
            self.precision_plugin, "_desired_dtype", None
        )
        if isinstance(autocast, torch.dtype):
            return autocast
        param = next(iter(self._stage_parameters()), None)
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
        if self._sigterm is not None and self._sigterm.agreed:
            return  # every rank stops at this batch by itself; each may still save (OnExceptionCheckpoint)
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
        # stage): reduce over the data-parallel replicas, as DDP reduces over its ranks.
        # A reduction over the world would count each replica pp times ("sum").
        if not isinstance(tensor, Tensor) or not dist.is_initialized():
            return tensor
        if _is_default_group(group):
            if self.dp_size == 1:
                return tensor
            group = self._dp_group
        with named_failures(f"reduce a value ({reduce_op}) over the replicas", group, timeout=self._timeout):
            return _sync_ddp(tensor, group=group, reduce_op=reduce_op)

    @override
    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        # Over the replicas (the stages of one replica hold copies): one entry per
        # replica, as DDP gives one per rank; one replica returns the tensor as one device does.
        if _is_default_group(group):
            if self.dp_size == 1:
                return tensor
            group = self._dp_group
        with named_failures("all-gather a tensor over the replicas", group, timeout=self._timeout):
            return _all_gather_ddp_if_available(tensor, group=group, sync_grads=sync_grads)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        # Lightning's version sums through `reduce` and compares with the world size;
        # `reduce` covers the replicas only, so count the votes of every rank here.
        if not dist.is_initialized():
            return decision
        votes = torch.tensor(int(decision), device=self.root_device)
        with named_failures("agree on a decision (e.g. early stopping) over every rank", timeout=self._timeout):
            dist.all_reduce(votes, op=dist.ReduceOp.SUM)
        return bool(votes == self.world_size) if all else bool(votes)


#: Lightning's PossibleUserWarning for epoch-level values logged without sync_dist.
_SYNC_DIST_ADVICE = r"It is recommended to use `self\.log\(.*sync_dist=True\)` when logging on epoch level"


def _is_default_group(group: Optional[Any]) -> bool:
    """No group, or the world: what ``self.log(sync_dist=True)`` and ``self.all_gather`` pass by default."""
    return group is None or (dist.is_initialized() and group is dist.group.WORLD)


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
