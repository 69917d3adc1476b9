"""``PPStrategy``'s steps: training, validation and test run whole pipeline schedules.

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

Kept apart from the strategy's set-up so each file does one job. The mixin reads
the pipeline state the strategy sets up (``pp_rank``, ``_pipelined``, ``_comm``,
``topology``, the groups).
"""

from __future__ import annotations

import hashlib
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_pp.distributed.broadcasts import RepeatedBroadcast
from lightning_pp.distributed.errors import named_failures
from lightning_pp.distributed.objects import all_gather_int
from lightning_pp.integration.strategy_state import PipelineStrategyState
from lightning_pp.parallel.gradients import (
    clip_grad_norm_across_stages,
    grad_norm_across_stages,
    reduce_stage_gradients,
    sum_over_group,
)
from lightning_pp.pipeline.executor import PipelineExecutor
from lightning_pp.pipeline.microbatch import batch_rows, microbatch_shares, split_microbatches
from lightning_pp.pipeline.recorder import TraceRecorder
from lightning_pp.pipeline.schedules import Schedule, build_schedule
from lightning_pp.pipeline.step_outputs import (
    LogRecorder,
    concat_outputs,
    extract_loss,
    weighted_mean,
)
from lightning_pp.tree import map_tensors, tree_flatten

__all__ = ["StepsMixin"]


def _refuse_metric_object(name: str, value: Any) -> None:
    """Raises for a ``torchmetrics.Metric`` logged as itself, which a pipelined step cannot log as one device does.

    Its state is on the stage whose code updates it (after the Sequential call: the
    last), while every stage logs; and its step value would be the last microbatch's.
    """
    from torchmetrics import Metric

    if isinstance(value, Metric):
        raise MisconfigurationException(
            f"PPStrategy cannot log the torchmetrics object {type(value).__name__} as {name!r} (self.log({name!r}, "
            "metric)): its state is on the pipeline stage that updates it, and a step runs as several microbatches. "
            f"Log the value it returns instead, e.g. self.log({name!r}, self.metric(preds, target)): microbatch "
            "values are weighted by their rows, which gives the batch's value for a per-row mean such as "
            "micro-averaged accuracy, and Lightning's epoch mean weights batches by their size. Metrics that are "
            "not per-row means (macro averages, AUROC) cannot be logged exactly under PPStrategy yet."
        )


class StepsMixin(PipelineStrategyState):
    """Step hooks of :class:`~lightning_pp.integration.strategy.PPStrategy` (see the module docstring)."""

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
        if self._blocks is not None:
            return PipelineExecutor(
                {},
                schedule,
                self.pp_rank,
                self._comm if self.pp_size > 1 else None,
                sequential_name=f"self.{self._pipelined_attr}",
                block_stages=self._blocks,
            )
        assert self._pipelined is not None
        return PipelineExecutor(
            self._pipelined.stages,
            schedule,
            self.pp_rank,
            self._comm if self.pp_size > 1 else None,
            sequential_name=f"self.{self._pipelined_attr}",
        )

    def _split(self, batch: Any, *, weighted: bool = True) -> tuple[list[Any], list[float]]:
        """The batch's microbatches (one per row at most) and each one's share of the batch.

        The share weighs the microbatch's loss and logged means: by its rows, or by
        ``PPStrategy(microbatch_weight=...)`` where ``weighted`` (not for predict, whose
        batches need not carry what the weight counts).
        """
        microbatches = split_microbatches(batch, min(self.num_microbatches, batch_rows(batch)))
        return microbatches, microbatch_shares(microbatches, self._microbatch_weight if weighted else None)

    @contextmanager
    def _microbatch_steps(self, hook: str, microbatches: list[Any], args: tuple, kwargs: dict) -> Iterator[tuple]:
        """Yields ``(step_fn, recorder)`` running the user's ``hook`` on each microbatch."""
        module = self.module
        recorder = LogRecorder()
        user_step = getattr(module, hook)
        pipelined = self._pipelined  # None for a block list: its blocks are hooked instead

        def step_fn(k: int, call_sequential: Any) -> Any:
            recorder.start_microbatch()
            if pipelined is not None:
                pipelined.handler = call_sequential
            try:
                return user_step(microbatches[k], *args, **kwargs)
            finally:
                if pipelined is not None:
                    pipelined.handler = None

        def log(name: str, value: Any, **log_kwargs: Any) -> None:
            _refuse_metric_object(name, value)
            recorder.log(name, value, **log_kwargs)

        def log_dict(dictionary: Any, **log_kwargs: Any) -> None:
            for name, value in dictionary.items():
                log(name, value, **log_kwargs)

        # Instance attributes shadow the methods: the user's `self.log` lands in the recorder.
        module.log, module.log_dict = log, log_dict  # type: ignore[method-assign, assignment]
        try:
            yield step_fn, recorder
        finally:
            del module.log, module.log_dict

    def _publisher(self) -> RepeatedBroadcast:
        """The broadcast of the last stage's output and logs, for the running hook and the current groups.

        One per hook (training, validation, ... steps share different values), so each
        repeats its own layout and costs one small collective per step.
        """
        group = self._pp_cpu_group or self._pp_group
        assert group is not None, "pp > 1 has a pipeline group once set up"
        stage = self.module.trainer.state.stage
        # stage -> (weak reference to its group, publisher): nothing here keeps a group alive
        publishers: dict = self.__dict__.setdefault("_publishers", {})
        known = publishers.get(stage)
        if known is None or known[0]() is not group:  # first use, or new groups (every rank alike)
            known = publishers[stage] = (
                weakref.ref(group),
                RepeatedBroadcast(
                    group,
                    dist.get_global_rank(group, self.pp_size - 1),
                    operation="share the loss and logged values of the last stage over the pipeline",
                    timeout=self._timeout,
                ),
            )
        return known[1]

    def _post_publish(self, recorder: LogRecorder, weights: list[float]) -> Optional["_EarlyPublish"]:
        """Posts this stage's receive of the step's loss and logs before the schedule runs.

        The last stage finishes its part of a step long before the first stage does
        (1F1B: by the pipeline's depth in backwards), so its values arrive while the
        earlier stages still compute. The returned :class:`_EarlyPublish` is the
        executor's ``idle`` callback: when the values are there and the stage is about
        to wait for a peer anyway, it logs them then, so that the step's end (on the
        first stage, every other stage's wait) has nothing left to do.
        """
        if self.pp_size == 1 or self.pp_rank == self.pp_size - 1:
            return None
        publisher = self._publisher()
        if not publisher.post():
            return None
        return _EarlyPublish(publisher.landed, lambda: self._publish_both(recorder, weights, None))

    def _published(
        self, early: Optional["_EarlyPublish"], recorder: LogRecorder, weights: list[float], output: Any
    ) -> tuple[Any, Any]:
        """What :meth:`_publish_both` returns: taken during the schedule if it was, else now."""
        if early is not None and early.result is not None:
            self._num_early_publishes += 1
            return early.result
        return self._publish_both(recorder, weights, output)

    def _publish_both(self, recorder: LogRecorder, weights: list[float], output: Any) -> tuple[Any, Any]:
        """Sends the last stage's combined output and logs to every stage, then logs them.

        Returns the output and its host copy (the loss is checked there without a device sync).
        """
        module = self.module
        is_last = self.pp_rank == self.pp_size - 1
        payload: Any = None
        if is_last:
            logs = recorder.combined(weights)
            payload = map_tensors(torch.Tensor.cpu, (output, logs))
        if self.pp_size > 1:
            payload = self._publisher()(payload)
        host_output, _ = payload
        output, logs = map_tensors(lambda t: t.to(self.root_device), payload)
        for name, (value, log_kwargs) in logs.items():
            # The class's method: during the schedule the instance's `log` is the recorder's.
            type(module).log(module, name, value, **log_kwargs)
        return output, host_output

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch, rest = args[0], args[1:]
        trainer = self.module.trainer
        scaler = getattr(self.precision_plugin, "scaler", None)
        accumulate = trainer.accumulate_grad_batches
        params: list[Tensor] = [p for p in self.module.parameters() if p.requires_grad]
        # Lightning zeroes the gradients between this step and backward on the first batch
        # of an accumulation window; then the old ones are garbage, and stashing them while
        # the schedule makes new ones would hold two sets of gradients at once.
        previous = [None if self._grads_will_be_zeroed(trainer) else p.grad for p in params]
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
                    # contributes its share of the batch (of its rows, or of microbatch_weight).
                    loss = extract_loss(step_output)
                    if weights[k] == 0:
                        # Nothing to average over (its loss may be 0/0 = NaN): it contributes no
                        # gradient, and its backward sends none on.
                        return loss.detach()
                    loss = loss * (weights[k] / accumulate)
                    return scaler.scale(loss) if scaler is not None else loss

                executor = self._executor(schedule)
                executor.tracer = tracer
                early = self._post_publish(recorder, weights)
                executor.idle = early
                results = executor.run(step_fn, loss_fn)
            output = None
            if results:
                output = weighted_mean([results[k] for k in range(len(weights))], weights)
                if isinstance(output, Tensor):
                    output = output.detach()
            waited_from = tracer.now() if tracer is not None else 0.0
            output, host_output = self._published(early, recorder, weights, output)
            if tracer is not None:
                # Time every stage spends waiting for the loss and logs of the last stage.
                tracer.add_span("wait", waited_from, tracer.now())
        if self.check_finite_loss:
            self._raise_if_not_finite(extract_loss(host_output), trainer, args[1] if len(args) > 1 else None)
        new_grads = [p.grad for p in params]
        for p, grad in zip(params, previous):
            p.grad = grad
        self._pending_grads = self._reduce_gradients(params, new_grads)
        return output

    def _grads_will_be_zeroed(self, trainer: "pl.Trainer") -> bool:
        """Whether Lightning zeroes the gradients right after this ``training_step``, unseen by user code.

        It does on the first batch of each accumulation window; a LightningModule or
        callback that overrides ``on_before_zero_grad`` or ``optimizer_zero_grad`` could
        still look at them, so then they are kept.
        """
        from lightning.pytorch.utilities.model_helpers import is_overridden

        batch_idx = trainer.fit_loop.epoch_loop.batch_idx
        if batch_idx % trainer.accumulate_grad_batches != 0:
            return False
        hooks = ("on_before_zero_grad", "optimizer_zero_grad")
        if any(is_overridden(hook, self.module) for hook in hooks):
            return False
        callbacks = getattr(trainer, "callbacks", [])
        return not any(is_overridden("on_before_zero_grad", callback) for callback in callbacks)

    def _raise_if_not_finite(self, loss: Tensor, trainer: "pl.Trainer", batch_idx: Any) -> None:
        """One check per step, on the host copy of the loss every stage already has: no device sync.

        With data parallelism the replicas agree over the CPU twin of their group when there is one.
        """
        finite = torch.isfinite(loss.detach().cpu()).all().to(torch.int32).reshape(1)
        if self.dp_size > 1:
            # Every replica must stop together, or the healthy ones wait forever.
            assert self.topology is not None
            cpu_group = self.topology.dp.cpu_group
            group = cpu_group if cpu_group is not None else self._dp_group
            if group is not cpu_group:
                finite = finite.to(self.root_device)
            with named_failures(
                "agree with the other data-parallel replicas whether the loss is finite",
                group,
                timeout=self._timeout,
            ):
                dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)
        if not bool(finite.item()):
            raise FloatingPointError(
                f"The training loss is not finite (this replica: {loss.item()}) at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}, batch {batch_idx}). Every pipeline rank stops here. Lower the "
                "learning rate, clip gradients or check the data; PPStrategy(check_finite_loss=False) trains on. "
                "If the loss is a mean over items some microbatch of this batch lacks (a Hugging Face loss over "
                "labels, where one microbatch's are all -100), that microbatch's loss is 0/0: pass "
                "PPStrategy(microbatch_weight='label_tokens') (or a function counting the items), which leaves it out "
                "as one device's mean over the whole batch does."
            )

    @override
    def on_train_start(self) -> None:
        trainer = self.module.trainer
        self._check_same_on_pipeline("training batches per epoch", trainer.num_training_batches)
        if self._sigterm is not None:
            self._sigterm.install_check()

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            # Once an epoch: every stage must read the same batches (a dataset shuffled with
            # no seed, or a sampler of the user's own, may order them per process).
            self._check_same_on_pipeline("rows in the first batch of the epoch", _batch_digest(batch), show=False)

    @override
    def on_train_end(self) -> None:
        if self._sigterm is not None:
            self._sigterm.finish()

    @override
    def on_validation_start(self) -> None:
        trainer = self.module.trainer
        self._check_same_on_pipeline("validation batches", trainer.num_val_batches)

    def _check_same_on_pipeline(self, what: str, value: Any, *, show: bool = True) -> None:
        """Fails on every rank when the stages of a pipeline disagree on ``value`` (a count, a batch's digest).

        ``show``: name each stage's value in the error (not for digests).
        """
        if self.pp_size == 1:
            return
        group = self._pp_cpu_group or self._pp_group
        operation = f"compare the number of {what} with the other stages"
        # One collective of one number (a digest of the value) rather than a pickled
        # object gather (two collectives): this runs at the start of every fit, validation
        # and predict. The values themselves are gathered only to name them in the error.
        digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
        mine = int.from_bytes(digest, "little", signed=True)
        digests = all_gather_int(mine, group, operation=operation, timeout=self._timeout)
        if all(d == mine for d in digests):
            return
        # Every rank sees the same digests: all raise.
        if not show:
            raise ValueError(
                f"The stages of one pipeline read different {what}: each stage reads the batches itself, and the "
                "step pairs the first stage's rows with the last stage's (its labels). The data's order depends on "
                "each process's random state: seed it alike on every rank (a dataset shuffled without a seed, e.g. "
                "datasets' .shuffle() with no seed=, or a sampler of your own that draws from a random state)."
            )
        values: list[Any] = [None] * self.pp_size
        with named_failures(operation, group, timeout=self._timeout):
            dist.all_gather_object(values, value, group=group)
        assert group is not None, "pp > 1 has a pipeline group once set up"
        ranks = [dist.get_global_rank(group, i) for i in range(self.pp_size)]
        raise ValueError(
            f"The stages of one pipeline see different numbers of {what}: {values} by pipeline rank, at global "
            f"ranks {ranks}. Every stage must iterate the same data: give each rank the same dataloader and let "
            "PPStrategy split it over data-parallel replicas."
        )

    def _reduce_gradients(self, params: list[Tensor], grads: list[Optional[Tensor]]) -> list[Optional[Tensor]]:
        """Averages over data-parallel replicas; sums parameters outside the Sequential over the pipeline.

        With context parallelism, attention parameters saw only this rank's tokens:
        their gradients are first summed over the cp group.
        """
        if self._cp_partial_ids:
            assert self.topology is not None
            partial = [g for p, g in zip(params, grads) if id(p) in self._cp_partial_ids and g is not None]
            sum_over_group(
                partial,
                self.topology.cp.device_group,
                operation="sum the attention gradients over the context-parallel group",
            )
        grads = self._sum_tied_gradients(params, grads)
        outside = self._outside_param_ids
        return reduce_stage_gradients(
            params,
            grads,
            shared=lambda p: id(p) in outside,
            pp_group=self._pp_group,
            pp_size=self.pp_size,
            dp_group=self._dp_group,
            dp_size=self.dp_size,
        )

    def _sum_tied_gradients(self, params: list[Tensor], grads: list[Optional[Tensor]]) -> list[Optional[Tensor]]:
        """Adds up the gradients of a weight tied across stages over its holders, as one device accumulates them."""
        if not self._tied_parameters:
            return grads
        grads = list(grads)
        index = {id(p): i for i, p in enumerate(params)}
        for param, group, _ in self._tied_parameters:  # the same order on every holder
            i = index.get(id(param))
            if i is None:
                continue  # frozen (requires_grad=False): no gradient on any holder
            grad = grads[i]
            if grad is None:
                grad = grads[i] = torch.zeros_like(param)
            sum_over_group(
                [grad],
                group,
                operation="sum the gradients of a weight tied across stages (e.g. an embedding and its output head)",
            )
        return grads

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Any], *args: Any, **kwargs: Any) -> Tensor:
        """Adds the gradients the schedule computed in ``training_step`` to ``.grad``.

        The precision plugin's pre/post hooks still run, so ``on_before_backward`` and
        ``on_after_backward`` fire as on one device.
        """
        module = self.module
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

    def gradient_norm(self) -> Tensor:
        """The 2-norm of the whole model's gradients, every stage's, as one device computes it.

        Every rank must call it (it adds up over the ranks that hold the model), e.g. in
        ``on_before_optimizer_step``::

            self.log("grad_norm", self.trainer.strategy.gradient_norm())

        There Lightning's ``grad_norm(module)`` would see this rank's stages only. A
        weight several ranks hold (tied across stages, outside the pipelined layers)
        counts once.
        """
        if self._counted_in_norm is None:
            raise RuntimeError("PPStrategy.gradient_norm() needs the pipeline set up: call it during fit.")
        return grad_norm_across_stages(
            self.module.parameters(),
            counted=self._counted_in_norm,
            group=self._replica_group,
            device=self.root_device,
            why="PPStrategy.gradient_norm",
        )

    def _clip_grad_by_norm(self, optimizer: Any, clip_val: Union[int, float]) -> None:
        """``clip_grad_norm_`` with the norm taken over every stage's gradients."""
        assert self._counted_in_norm is not None
        clip_grad_norm_across_stages(
            optimizer.param_groups,
            clip_val,
            counted=self._counted_in_norm,
            group=self._replica_group,
            device=self.root_device,
        )

    def _eval_step(self, hook: str, args: tuple, kwargs: dict, combine: str) -> Any:
        batch, rest = args[0], args[1:]
        plugin = self.precision_plugin
        context = plugin.val_step_context() if hook != "predict_step" else plugin.predict_step_context()
        microbatches, weights = self._split(batch, weighted=hook != "predict_step")
        with context, self._microbatch_steps(hook, microbatches, rest, kwargs) as (step_fn, recorder):
            executor = self._executor(self._schedule(len(weights), forward_only=True))
            early = self._post_publish(recorder, weights)
            executor.idle = early
            results = executor.run(step_fn)
        output = None
        outputs = [results[k] for k in sorted(results)]
        if outputs and all(o is not None for o in outputs):
            if combine == "mean":
                output = weighted_mean(outputs, weights)
            else:
                output = concat_outputs(outputs, [batch_rows(mb) for mb in microbatches])
        return self._published(early, recorder, weights, output)[0]

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("validation_step", args, kwargs, combine="mean")

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("test_step", args, kwargs, combine="mean")


class _EarlyPublish:
    """The executor's ``idle`` callback that publishes the last stage's values once they landed.

    Args:
        landed: whether the posted receive has its data (the publish will not wait).
        publish: runs the publish; its result is kept in :attr:`result`.
    """

    def __init__(self, landed: Callable[[], bool], publish: Callable[[], tuple[Any, Any]]) -> None:
        self._landed, self._publish = landed, publish
        #: ``(output, host output)`` once published during the schedule, else ``None``.
        self.result: Optional[tuple[Any, Any]] = None

    def __call__(self) -> None:
        if self.result is None and self._landed():
            self.result = self._publish()


def _batch_digest(batch: Any) -> str:
    """A digest of a batch's contents: every tensor's dtype, shape and bytes, and plain values (strings, numbers).

    Other values count by their type only: their text may hold a memory address.
    """
    digest = hashlib.blake2b(digest_size=16)
    _, leaves = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            digest.update(f"{leaf.dtype}{tuple(leaf.shape)}".encode())
            digest.update(leaf.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif leaf is None or isinstance(leaf, (str, int, float, bool, bytes)):
            digest.update(repr(leaf).encode())
        else:
            digest.update(type(leaf).__qualname__.encode())
    return digest.hexdigest()
