"""Stopping on SIGTERM together, without a collective on every training batch's critical path.

Lightning 2.6 broadcasts a flag from global rank 0 over the default group at the
start of every training batch and reads it back with ``.item()``: a collective that
waits for every rank, and on a device a host synchronisation, per batch. In a
pipeline the first stage ends a step last (it runs the last backward), so the other
stages wait there for it, and the next step starts later by the broadcast's latency
(about 1.5 ms a step on a 2-core CPU at pp=4, more when the machine is busy).

:class:`SigtermAgreement` takes its place. At the start of batch ``n`` every rank
collects the all-reduce (maximum) of the ranks' flags it posted at the start of batch
``n - 1`` (long finished by then), and posts the next one with its own flag. So
every rank reaches the same answer at the same batch and nobody waits for anybody:

    signal lands       batch n posts 1       batch n+1 reads 1: every rank raises
    (any rank)         (that rank)           SIGTERMException, at the same batch

A signal on *any* rank counts (Lightning's broadcast carries rank 0's only), and the
stop comes one batch later than Lightning's. Lightning's SIGTERM handler also
broadcasts from inside the handler, to meet the per-batch broadcast of the other
ranks; the handler installed here only records the signal (and, as Lightning's
does, passes it on to the ranks this process launched), and leaves the decision to
the agreement while training batches run. Outside them (validation, prediction)
it marks the signal at once, as Lightning does.

This relies on two private names of Lightning (``_TrainingEpochLoop._broadcast_sigterm_tensor``,
``_SignalConnector._sigterm_notifier_fn``); where they are missing, Lightning's own
behaviour stays.
"""

from __future__ import annotations

import logging
import weakref
from datetime import timedelta
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_pp.distributed.errors import named_failures

__all__ = ["SigtermAgreement"]

log = logging.getLogger(__name__)

_OPERATION = "agree with the other ranks whether any of them received SIGTERM"


class SigtermAgreement:
    """One rank's part in deciding, batch by batch, whether the job stops on SIGTERM.

    Args:
        trainer: the trainer whose fit loop and signal handler this takes over.
        group: a CPU (gloo) group of every rank of the job.
        timeout: the group's timeout, for error messages.
    """

    def __init__(self, trainer: "pl.Trainer", group: Any, timeout: Optional[timedelta] = None) -> None:
        # Weakly: releasing the process groups at exit must not be held up by this.
        self._group = weakref.ref(group)
        self.trainer, self.timeout = trainer, timeout
        #: Whether this process received SIGTERM (the ranks have not necessarily agreed yet).
        self.requested = False
        #: Whether the ranks agreed to stop (each raised ``SIGTERMException`` at the same batch).
        self.agreed = False
        self._posted: Optional[tuple[torch.Tensor, Any]] = None

    @property
    def group(self) -> Any:
        group = self._group()
        if group is None:
            raise RuntimeError(f"The process group to {_OPERATION} over was released.")
        return group

    def install_handler(self) -> bool:
        """Replaces Lightning's SIGTERM notifier (before Lightning registers it); ``False`` where it cannot."""
        connector = getattr(self.trainer, "_signal_connector", None)
        if connector is None or not callable(getattr(connector, "_sigterm_notifier_fn", None)):
            return False
        connector._sigterm_notifier_fn = self._notify
        return True

    def install_check(self) -> bool:
        """Replaces the fit loop's per-batch broadcast; ``False`` where this Lightning has none."""
        loop = self.trainer.fit_loop.epoch_loop
        if not callable(getattr(loop, "_broadcast_sigterm_tensor", None)):
            return False
        self._posted = None
        loop._broadcast_sigterm_tensor = self.check  # type: ignore[method-assign]
        return True

    def _notify(self, signum: Any, frame: Any) -> None:
        log.info(f"[rank {self.trainer.global_rank}] received SIGTERM ({signum})")
        if not self.requested:
            launcher = self.trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        self.requested = True
        if self.trainer.state.stage != RunningStage.TRAINING:
            # No training batch will ask: as Lightning, the loops stop at their next check.
            self.trainer._signal_connector.received_sigterm = True

    def check(self) -> None:
        """At the start of a training batch: reads the last agreement, posts the next.

        Raises:
            SIGTERMException: on every rank alike, when any rank had received SIGTERM
                by the start of the previous batch.
        """
        if self._collect():
            self.agreed = True
            self.trainer._signal_connector.received_sigterm = True
            raise SIGTERMException()
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        with named_failures(_OPERATION, self.group, timeout=self.timeout):
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._posted = (flag, work)

    def finish(self) -> None:
        """Collects the agreement still in flight (every rank at the end of its training batches)."""
        self._collect()

    def _collect(self) -> bool:
        posted, self._posted = self._posted, None
        if posted is None:
            return False
        flag, work = posted
        with named_failures(_OPERATION, self.group, timeout=self.timeout):
            work.wait()
        return bool(flag.item())
