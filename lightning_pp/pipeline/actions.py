"""The schedule data model: actions, per-rank action lists and their checks.

An :class:`Action` is one step of one pipeline rank (``1F3``: stage 1's forward of
microbatch 3); a :class:`Schedule` holds every rank's actions in order. Builders
live in :mod:`~lightning_pp.pipeline.schedules`, checking and timing in
:mod:`~lightning_pp.pipeline.simulation`; both read this module only.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional, Tuple

__all__ = ["Action", "Op", "Schedule", "ScheduleError", "check_sizes"]


class ScheduleError(ValueError):
    """A schedule is malformed, or cannot complete when sends wait for receives."""


class Op(str, enum.Enum):
    """What an :class:`Action` does; the value is its letter(s) in ``str(action)``.

    A microbatch's backward on a stage is either one ``B`` (input and weight
    gradients together), or, in zero-bubble schedules, an ``I`` (the gradient
    w.r.t. the stage's input, which the previous stage waits for) followed later
    by a ``W`` (the gradients w.r.t. its weights, which nothing waits for). The
    letters are torch.distributed.pipelining's.
    """

    FORWARD = "F"
    BACKWARD = "B"
    BACKWARD_INPUT = "I"  # grad w.r.t. the stage's input only; keeps the graph for W
    BACKWARD_WEIGHT = "W"  # grads w.r.t. the weights, after the same microbatch's I; frees the graph
    SEND_ACT = "SEND_F"  # output of stage s -> rank of stage s + 1
    RECV_ACT = "RECV_F"  # input of stage s <- rank of stage s - 1
    SEND_GRAD = "SEND_B"  # grad w.r.t. input of stage s -> rank of stage s - 1
    RECV_GRAD = "RECV_B"  # grad w.r.t. output of stage s <- rank of stage s + 1

    @property
    def is_compute(self) -> bool:
        return self in (Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT)

    @property
    def is_backward(self) -> bool:
        """Any backward: ``B``, ``I`` or ``W``."""
        return self in (Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT)

    @property
    def makes_input_grad(self) -> bool:
        """Consumes the output gradient and produces the input gradient: ``B`` or ``I``."""
        return self in (Op.BACKWARD, Op.BACKWARD_INPUT)

    @property
    def releases_activations(self) -> bool:
        """The last use of a microbatch's activations on its stage: ``B`` or ``W``."""
        return self in (Op.BACKWARD, Op.BACKWARD_WEIGHT)

    @property
    def is_send(self) -> bool:
        return self in (Op.SEND_ACT, Op.SEND_GRAD)

    @property
    def is_recv(self) -> bool:
        return self in (Op.RECV_ACT, Op.RECV_GRAD)


@dataclasses.dataclass(frozen=True)
class Action:
    """One step of one pipeline rank.

    Args:
        op: What to do.
        stage: Global stage index, ``0 <= stage < num_stages``.
        microbatch: Microbatch index.
        peer: For communication ops, the pipeline rank on the other side; ``None`` for
            compute ops.
    """

    op: Op
    stage: int
    microbatch: int
    peer: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", Op(self.op))
        for field in ("stage", "microbatch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Action.{field} must be an int >= 0, got {value!r}")
        if self.op.is_compute and self.peer is not None:
            raise ValueError(f"{self}: compute actions run locally; leave peer=None")
        if not self.op.is_compute and (not isinstance(self.peer, int) or self.peer < 0):
            raise ValueError(f"{self}: a send or receive needs peer=<pipeline rank>, got {self.peer!r}")

    def __str__(self) -> str:
        return f"{self.stage}{self.op.value}{self.microbatch}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-rank action lists for one training (or inference) step.

    Args:
        name: Canonical schedule name, one of :data:`SCHEDULES` (free text for hand-made ones).
        pp_size: Number of pipeline ranks ``p``.
        num_microbatches: Number of microbatches ``m`` per step.
        virtual_stages: Stages per rank ``v``; there are ``p * v`` stages.
        forward_only: Whether only forwards run (validation, inference).
        actions: ``actions[r]`` is rank ``r``'s actions in execution order, comm included.
    """

    name: str
    pp_size: int
    num_microbatches: int
    virtual_stages: int
    forward_only: bool
    actions: Tuple[Tuple[Action, ...], ...]

    def __post_init__(self) -> None:
        check_sizes(self.pp_size, self.num_microbatches, self.virtual_stages)
        object.__setattr__(self, "actions", tuple(tuple(rank_actions) for rank_actions in self.actions))
        if len(self.actions) != self.pp_size:
            raise ValueError(
                f"Schedule has action lists for {len(self.actions)} ranks but pp_size={self.pp_size}: "
                "give exactly one list per pipeline rank"
            )
        for rank, rank_actions in enumerate(self.actions):
            for action in rank_actions:
                if not isinstance(action, Action):
                    raise TypeError(f"rank {rank}: expected Action, got {action!r}")

    @property
    def num_stages(self) -> int:
        """Total number of stages, ``pp_size * virtual_stages``."""
        return self.pp_size * self.virtual_stages

    def stage_to_rank(self, stage: int) -> int:
        """Pipeline rank that holds ``stage`` (looping placement: ``stage % pp_size``)."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} out of range: this schedule has stages 0..{self.num_stages - 1}")
        return stage % self.pp_size

    def stages_of_rank(self, rank: int) -> Tuple[int, ...]:
        """Stages held by pipeline ``rank``, in pipeline order."""
        if not 0 <= rank < self.pp_size:
            raise ValueError(f"rank {rank} out of range: this schedule has pipeline ranks 0..{self.pp_size - 1}")
        return tuple(range(rank, self.num_stages, self.pp_size))

    @property
    def splits_backward(self) -> bool:
        """Whether backwards run as ``I`` then ``W`` (zero-bubble) rather than as one ``B``."""
        return any(a.op is Op.BACKWARD_WEIGHT for rank_actions in self.actions for a in rank_actions)

    def format(self) -> str:
        """One line per rank: ``rank 0: 0F0 0SEND_F0 ...``."""
        return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.actions))


def check_sizes(pp_size: int, num_microbatches: int, virtual_stages: int) -> None:
    """Raises ``ValueError`` naming the first size that is not a positive int."""
    for name, value, hint in (
        ("pp_size", pp_size, "the number of pipeline ranks"),
        ("num_microbatches", num_microbatches, "how many pieces each batch is split into"),
        ("virtual_stages", virtual_stages, "stages per rank; 1 unless interleaving"),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int ({hint}), got {value!r}")
