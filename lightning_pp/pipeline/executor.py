"""Runs one rank's part of a pipeline schedule: forwards, backwards, sends and receives.

The executor knows nothing of Lightning. It is handed

* the rank's stage modules (``stage index -> nn.Module``),
* a :class:`~lightning_pp.pipeline.schedules.Schedule` (the per-rank action lists),
* a ``step_fn(k, call_sequential)`` that runs the user's step on microbatch ``k``,
  with ``call_sequential`` standing in for the pipelined ``nn.Sequential``.

The first stage runs ``step_fn`` until it calls the Sequential, computes stage 0 on
that input, and stops the step there (the rest of the step needs the last
stage's output). The last stage runs ``step_fn`` in full, with the Sequential call
answered by its own stage applied to the activation it received, so the user's
loss code runs unchanged. Middle stages only apply their layers.

Communication follows the schedule's order, with two liberties that cannot
create a wait the proven order does not have: sends are posted and waited for at
the end of the step (their buffers kept until then), and the rank's next receive
is posted before the compute that precedes it, so its data lands meanwhile. Where
posted sends block nothing (gloo; not NCCL, whose transfers between two ranks
run in posting order on one stream), the sends between two computes are also
posted before the receives there (:func:`sends_first`).

A zero-bubble schedule splits a backward in two
(:class:`~lightning_pp.pipeline.backward_split.SplitBackward`): ``I``
back-propagates to the stage's received inputs only and keeps the graph; the
gradient it leaves there is sent on. ``W``, later, computes the gradients of the
graph's other leaves -- the stage's weights and any parameter the user's step used
around the Sequential -- and frees the graph. Each parameter gets the gradient one
full backward gives. Between ``I`` and ``W`` the graph stays alive
(``peak_live_activations`` counts a microbatch until its ``W``). On a stage without
received inputs that need a gradient (the first stage) ``I`` has nothing to do
and ``W`` runs the whole backward.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from lightning_pp.distributed.p2p import PipeComm, PostedRecv, flatten_payload
from lightning_pp.pipeline.backward_split import SplitBackward
from lightning_pp.pipeline.block_stage import BlockPipeline
from lightning_pp.pipeline.recorder import TraceRecorder
from lightning_pp.pipeline.schedules import Action, Op, Schedule
from lightning_pp.tree import map_tensors

__all__ = [
    "PipelineExecutor",
    "SequentialCallError",
    "StepFn",
    "run_step_to_end",
    "run_step_to_first_stage",
    "sends_first",
]

StepFn = Callable[[int, Callable[[Any], Any]], Any]
LossFn = Callable[[int, Any], torch.Tensor]


class SequentialCallError(RuntimeError):
    """The user's step did not call the pipelined ``nn.Sequential`` exactly once."""


class _StageBoundary(BaseException):
    # A BaseException, so a user's `except Exception:` around the model call
    # cannot swallow the signal that the first stage's part of the step is done.
    pass


def _call_count_message(sequential_name: str, how: str) -> str:
    return (
        f"The step called {sequential_name} {how}. A pipelined step must call the pipelined nn.Sequential "
        "exactly once per step (its layers are spread over the pipeline ranks); compute everything else before "
        "or after that single call."
    )


def run_step_to_end(
    run: Callable[[Callable[[Any], Any]], Any], answer: Callable[[Any], Any], sequential_name: str
) -> Any:
    """Runs a user step whose one call of the pipelined Sequential is answered by ``answer``.

    ``run(handler)`` runs the step with ``handler`` standing in for the Sequential.
    The last stage answers with its layers applied to the activation it received;
    a single-stage pipeline with all its layers applied to the step's own input.

    Raises:
        SequentialCallError: the step called the Sequential more than once, or not at all.
    """
    calls = 0

    def handler(x: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise SequentialCallError(_call_count_message(sequential_name, "more than once"))
        return answer(x)

    result = run(handler)
    if calls == 0:
        raise SequentialCallError(_call_count_message(sequential_name, "not at all"))
    return result


def run_step_to_first_stage(
    run: Callable[[Callable[[Any], Any]], Any], first_stage: Callable[[Any], Any], sequential_name: str
) -> Any:
    """Runs a user step up to its call of the pipelined Sequential; returns the first stage's output.

    The rest of the step needs the last stage's output, so it is cut off there.
    """
    captured: list[Any] = []

    def handler(x: Any) -> Any:
        captured.append(first_stage(x))
        raise _StageBoundary

    try:
        run(handler)
    except _StageBoundary:
        return captured[0]
    raise SequentialCallError(_call_count_message(sequential_name, "not at all"))


def _no_sequential(x: Any) -> Any:
    raise RuntimeError("A model pipelined by its block list has no pipelined nn.Sequential to call.")


def _tensors(payload: Any) -> list[Optional[torch.Tensor]]:
    return flatten_payload(payload)[1]


def sends_first(actions: Sequence[Action]) -> tuple[Action, ...]:
    """``actions`` with, between each two computes, the sends moved ahead of the receives.

    Only for sends that never block their sender (posted, waited for at the end of
    the step): a send then cannot hold anyone up, and posting it before this rank
    waits in a receive lets the peer go on sooner (in 1F1B's steady state an odd rank
    receives its next input first and only then sends the gradient the previous rank
    waits for). Each send still follows the compute that made its payload, and
    receives keep their order, so the schedule's proof under blocking sends carries
    over. Where a posted send blocks until its receiver is there -- XCCL's ``isend`` on
    the host, NCCL's on the pair's stream -- the proven order must be kept, and is
    (``PipeComm.sends_never_block``).
    """
    out: list[Action] = []
    gap: list[Action] = []
    for action in actions:
        if action.op.is_compute:
            out += [a for a in gap if a.op.is_send] + [a for a in gap if a.op.is_recv] + [action]
            gap = []
        else:
            gap.append(action)
    return tuple(out + [a for a in gap if a.op.is_send] + [a for a in gap if a.op.is_recv])


def _receive_args(action: Action) -> tuple[str, tuple[Op, int]]:
    """What a receive carries (for error messages) and its channel: the sending action's op and stage."""
    if action.op is Op.RECV_ACT:
        return f"the input of stage {action.stage}, microbatch {action.microbatch},", (Op.SEND_ACT, action.stage - 1)
    what = f"the output gradients of stage {action.stage}, microbatch {action.microbatch},"
    return what, (Op.SEND_GRAD, action.stage + 1)


class _ReceiveAhead:
    """Posts a rank's next receive before the compute that precedes it, so its data lands meanwhile.

    One receive ahead at most, posted only once every earlier receive completed:
    receives stay in the schedule's order, and a posted receive blocks no one on the
    host. Where transfers run in posting order on a device stream (NCCL: one stream
    per pair of ranks, a send waiting there for its receiver), a receive posted ahead
    of a send to the same peer could wait behind the send the peer needs first; so
    there it is posted ahead only when no send to that peer lies in between.
    """

    def __init__(
        self, actions: tuple[Action, ...], comm: Optional[PipeComm], idle: Optional[Callable[[], None]] = None
    ) -> None:
        self.actions, self.comm, self.idle = actions, comm, idle
        self.may_pass_sends = comm is not None and comm.sends_never_block
        self.receives = [i for i, a in enumerate(actions) if a.op.is_recv]
        self.next = 0  # position in `receives` of the first receive neither posted nor done
        self.posted: dict[int, PostedRecv] = {}

    def post_next(self, index: int) -> None:
        if self.comm is None or self.posted or self.next >= len(self.receives):
            return
        j = self.receives[self.next]
        if j > index:
            action = self.actions[j]
            if not self.may_pass_sends and any(
                a.op.is_send and a.peer == action.peer for a in self.actions[index + 1 : j]
            ):
                return
            what, channel = _receive_args(action)
            assert action.peer is not None
            self.posted[j] = self.comm.post_recv(action.peer, channel=channel, what=what)
            self.next += 1

    def receive(self, index: int) -> Any:
        if self.comm is None:
            raise RuntimeError("This schedule sends between ranks but the executor has no PipeComm.")
        action = self.actions[index]
        what, channel = _receive_args(action)
        handle = self.posted.pop(index, None)
        if handle is None:
            self.next += 1
        if self.idle is not None and (handle is None or not handle.landed()):
            self.idle()  # this rank is about to wait anyway
        assert action.peer is not None
        return self.comm.recv(action.peer, what=what, channel=channel, posted=handle)


class PipelineExecutor:
    """Executes a schedule's actions for one pipeline rank.

    Args:
        stages: the stage modules this rank holds, by stage index.
        schedule: the schedule; its ``actions[pp_rank]`` are what this rank runs.
        pp_rank: this rank's position in the pipeline.
        comm: the point-to-point channel (``None`` only when ``pp_size == 1``).
        sequential_name: how the user's code knows the Sequential, for error messages.
        block_stages: for a model that calls its blocks in its own loop, this rank's
            :class:`~lightning_pp.pipeline.block_stage.BlockPipeline`: every stage then
            runs the whole step as that stage (``stages`` is not used).
    """

    def __init__(
        self,
        stages: Mapping[int, nn.Module],
        schedule: Schedule,
        pp_rank: int,
        comm: Optional[PipeComm],
        *,
        sequential_name: str = "the pipelined nn.Sequential",
        block_stages: Optional[BlockPipeline] = None,
    ) -> None:
        self.stages = dict(stages)
        self.block_stages = block_stages
        self.schedule = schedule
        self.pp_rank = pp_rank
        self.comm = comm
        self.sequential_name = sequential_name
        self.last_stage = schedule.num_stages - 1
        #: Most microbatches whose forward activations this rank held at once in the
        #: last run (what 1F1B bounds by the pipeline depth and GPipe does not).
        self.peak_live_activations = 0
        #: Records each action's start and end while tracing is on (see lightning_pp.tracing.trace).
        self.tracer: Optional[TraceRecorder] = None
        #: Called (without arguments) when this rank is about to wait for a receive whose data
        #: has not arrived: a caller's chance to do work that would otherwise follow the step.
        #: It must not block on a peer, and runs at most once per receive.
        self.idle: Optional[Callable[[], None]] = None

    def run(self, step_fn: StepFn, loss_fn: Optional[LossFn] = None) -> dict[int, Any]:
        """Runs every action of this rank in order.

        Args:
            step_fn: runs the user's step for microbatch ``k``.
            loss_fn: ``loss_fn(k, step_output)`` returns the tensor to back-propagate
                for microbatch ``k`` (already weighted and scaled). Required unless the
                schedule is forward-only.

        Returns:
            On the rank holding the last stage, each microbatch's step output; else ``{}``.
        """
        if not self.schedule.forward_only and loss_fn is None:
            raise ValueError("A schedule with backward actions needs a loss_fn.")
        inputs: dict[tuple[int, int], Any] = {}
        outputs: dict[tuple[int, int], Any] = {}
        grads: dict[tuple[int, int], Any] = {}
        input_grads: dict[tuple[int, int], list[Optional[torch.Tensor]]] = {}
        splits: dict[tuple[int, int], SplitBackward] = {}  # I ran, W has not
        results: dict[int, Any] = {}
        self.peak_live_activations = 0
        keep_graph = not self.schedule.forward_only
        tracer = self.tracer if self.tracer is not None and self.tracer.active else None
        actions = self.schedule.actions[self.pp_rank]
        if self.comm is not None and self.comm.sends_never_block:
            actions = sends_first(actions)
        ahead = _ReceiveAhead(actions, self.comm, self.idle)
        for index, action in enumerate(actions):
            start = tracer.now() if tracer is not None else 0.0
            key = (action.stage, action.microbatch)
            op = action.op
            if op.is_compute:
                ahead.post_next(index)
            if op is Op.RECV_ACT:
                inputs[key] = ahead.receive(index)
            elif op is Op.FORWARD:
                out = self._forward(action, inputs.get(key), step_fn, results, loss_fn)
                if not keep_graph:
                    inputs.pop(key, None)
                outputs[key] = out
                self.peak_live_activations = max(self.peak_live_activations, len(outputs))
            elif op is Op.SEND_ACT:
                out = outputs[key] if keep_graph else outputs.pop(key)
                self._comm().send(
                    out,
                    self._peer(action),
                    where=f"the output of pipeline stage {action.stage}",
                    wait=False,
                    channel=(Op.SEND_ACT, action.stage),
                )
            elif op is Op.RECV_GRAD:
                grads[key] = ahead.receive(index)
            elif op is Op.BACKWARD:
                self._backward(action, outputs.pop(key), grads.pop(key, None))
                input_grads[key] = [
                    t.grad if t is not None and t.requires_grad else None for t in _tensors(inputs.pop(key, None))
                ]
            elif op is Op.BACKWARD_INPUT:
                # The outputs stay (counted as live) until the W; the inputs' gradients go on.
                input_grads[key], splits[key] = self._backward_input(
                    action, outputs[key], grads.pop(key, None), inputs.pop(key, None)
                )
            elif op is Op.BACKWARD_WEIGHT:
                splits.pop(key).backward_weight()
                del outputs[key]
                if key[0] == self.last_stage and key[1] in results:
                    # The step's output (a loss, logits) would keep the graph -- and whatever the
                    # split left saved in it -- alive until the step ends: hand it back detached.
                    results[key[1]] = map_tensors(torch.Tensor.detach, results[key[1]])
            elif op is Op.SEND_GRAD:
                self._comm().send(
                    input_grads.pop(key),
                    self._peer(action),
                    where="input gradients",
                    wait=False,
                    channel=(Op.SEND_GRAD, action.stage),
                )
            else:  # pragma: no cover - the schedule validator rules this out
                raise ValueError(f"unknown action {action}")
            if tracer is not None:
                tracer.record(action, start, tracer.now())
        if not keep_graph:
            outputs.clear()
        if self.comm is not None:
            # Sends were posted without waiting (the schedule's order is unchanged, so it
            # stays proven under blocking sends); the step ends when they are done.
            self.comm.wait_sends()
        return results

    # -- pieces ----------------------------------------------------------------------------
    def _comm(self) -> PipeComm:
        if self.comm is None:
            raise RuntimeError("This schedule sends between ranks but the executor has no PipeComm.")
        return self.comm

    @staticmethod
    def _peer(action: Action) -> int:
        assert action.peer is not None, f"{action} has no peer"
        return action.peer

    def _forward(
        self, action: Action, stage_input: Any, step_fn: StepFn, results: dict[int, Any], loss_fn: Optional[LossFn]
    ) -> Any:
        stage, k = action.stage, action.microbatch

        def run(handler: Callable[[Any], Any]) -> Any:
            return step_fn(k, handler)

        if self.block_stages is not None:
            last = stage == self.last_stage
            out = self.block_stages.run_stage(stage, stage_input, lambda: run(_no_sequential), stop=not last)
            if not last:
                return out
            results[k] = out
            return loss_fn(k, out) if loss_fn is not None else None
        module = self.stages[stage]
        if stage == self.last_stage:
            result = run_step_to_end(run, lambda x: module(x if stage == 0 else stage_input), self.sequential_name)
            results[k] = result
            return loss_fn(k, result) if loss_fn is not None else None
        if stage == 0:
            return run_step_to_first_stage(run, module, self.sequential_name)
        return module(stage_input)

    def _roots(
        self, action: Action, output: Any, output_grads: Any
    ) -> tuple[list[torch.Tensor], Optional[list[torch.Tensor]]]:
        """The tensors a backward starts from and their gradients (``None``: the last stage's scalar loss)."""
        if action.stage == self.last_stage:
            return ([output] if output is not None and output.requires_grad else []), None
        pairs = [
            (t, g)
            for t, g in zip(_tensors(output), output_grads or [])
            if t is not None and g is not None and t.requires_grad
        ]
        return [t for t, _ in pairs], [g for _, g in pairs]

    def _backward(self, action: Action, output: Any, output_grads: Any) -> None:
        roots, root_grads = self._roots(action, output, output_grads)
        if roots:
            torch.autograd.backward(roots, grad_tensors=root_grads)

    def _backward_input(
        self, action: Action, output: Any, output_grads: Any, stage_input: Any
    ) -> tuple[list[Optional[torch.Tensor]], SplitBackward]:
        """``I``: the received inputs' gradients (to send), and the split whose ``W`` is still to run."""
        tensors = _tensors(stage_input)
        wanted = [t for t in tensors if t is not None and t.requires_grad]
        roots, root_grads = self._roots(action, output, output_grads)
        split = SplitBackward(roots, root_grads, wanted)
        split.backward_input()
        input_grads = [t.grad if t is not None and t.requires_grad else None for t in tensors]
        for t in wanted:
            t.grad = None  # the graph keeps the input alive until W; its gradient need not stay with it
        return input_grads, split
