"""Starting the ranks so that a bad configuration ends with its own error and exit code 1.

Lightning's ``_SubprocessScriptLauncher`` re-runs the script once per extra local rank
and watches the children; when one exits non-zero it SIGKILLs the others *and the
launching process* within 5 s. An error that every rank raises (no ``nn.Sequential``,
fewer layers than stages) then often reaches the user as exit code 137 with the
reason missing: the launching process was killed before it printed its own copy.

:class:`PipelineLauncher` does two things about it:

1. Before any child starts, it runs the strategy's ``check_before_launch`` on the
   module, so errors that every rank would raise are raised once, in the launching
   process, with nothing else running.
2. Its child observer, once a child failed and the others are stopped, gives the
   launching process a grace period to raise and print its own error before it
   is killed (it is killed only if it is still stuck after that).

The children are the script run again. Code given as ``python -c "..."`` or on
standard input has no script to run again; Lightning's launcher would start
``python /current/dir/-c`` and fail with "can't open file", so that case is refused
first, saying what to do instead.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from typing_extensions import override

__all__ = ["PipelineLauncher", "check_script_can_be_rerun"]

#: Seconds the launching process gets to end by itself after a child failed.
GRACE_SECONDS = 15.0


class _PatientObserver(_ChildProcessObserver):
    """Lightning's child observer, but the launching process may finish raising first."""

    def __init__(self, main_pid: int, child_processes: list, grace: float) -> None:
        super().__init__(main_pid=main_pid, child_processes=child_processes)
        self._grace = grace

    @override
    def _terminate_all(self) -> None:
        for child in self._child_processes:
            child.send_signal(self._termination_signal)
        # This thread is a daemon of the launching process: if that process ends
        # during the sleep (having printed its error), nothing below runs.
        time.sleep(self._grace)
        os.kill(self._main_pid, self._termination_signal)


def check_script_can_be_rerun(num_processes: int) -> None:
    """Raises when this process runs code that the launcher cannot start again (``python -c``, stdin).

    ``python -m package.module`` and ``python path/to/script.py`` can be run again; so can
    anything started by ``torchrun`` or SLURM, which never reaches this check.
    """
    import __main__

    if getattr(__main__, "__spec__", None) is not None or sys.argv[0] not in ("-c", "-", ""):
        return
    how = "with python -c" if sys.argv[0] == "-c" else "on standard input"
    raise RuntimeError(
        f"PPStrategy starts one process per device ({num_processes} here) by running your script again for each "
        f"extra device, but this code was given {how}, so there is no script to run again. Save it to a file and "
        f"run `python your_script.py`, or start the processes yourself: `torchrun --nproc-per-node {num_processes} "
        "your_script.py`."
    )


class PipelineLauncher(_SubprocessScriptLauncher):
    """``_SubprocessScriptLauncher`` with a check before launch and a patient child observer.

    Args:
        check_before_launch: called with the trainer and the launched function's
            arguments (the LightningModule first) in the launching process, before
            any child starts; raises what every rank would raise.
        grace: seconds the launching process may take to end after a child failed.
    """

    def __init__(
        self,
        cluster_environment: ClusterEnvironment,
        num_processes: int,
        num_nodes: int,
        *,
        check_before_launch: Callable[[Optional[pl.Trainer], tuple], None],
        grace: float = GRACE_SECONDS,
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._check_before_launch = check_before_launch
        self._grace = grace

    @override
    def launch(self, function: Callable, *args: Any, trainer: Optional[pl.Trainer] = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            if self.num_processes > 1:
                check_script_can_be_rerun(self.num_processes)
            self._check_before_launch(trainer, args)
            self._call_children_scripts()
            _PatientObserver(os.getpid(), self.procs, self._grace).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)
