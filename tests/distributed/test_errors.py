"""Named errors for collectives (``lightning_pp.distributed.errors``).

Pure message tests first; then real gloo jobs, each rank its own process, in which
a rank dies or stalls just before a collective: the survivor must fail in bounded
time with a :class:`CollectiveError` that names itself, the operation and the
group's global ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest

from lightning_pp.distributed.errors import (
    CollectiveError,
    describe_collective_failure,
    named_failures,
)
from lightning_pp.distributed.p2p import PipeCommError

JOB = Path(__file__).parents[1] / "collective_job.py"

GLOO_LOST = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:33185. "
    "This is typically caused by a remote worker crashing. Check the logs of the remote worker."
)
GLOO_TIMEOUT = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv "
    "operation to complete"
)


@pytest.mark.parametrize(
    "text, timeout, cause, expected",
    [
        (GLOO_LOST, None, "lost", "lost the connection: a rank of that group died or closed its connection "
         "(Connection closed by peer [127.0.0.1]:33185)"),
        ("[pair.cc:537] Read error [127.0.0.1]:19858: Connection reset by peer", None, "lost",
         "(Read error [127.0.0.1]:19858: Connection reset by peer)"),
        (GLOO_TIMEOUT, None, "timeout", "timed out after 10s (Timed out waiting 10000ms for recv operation"),
        (GLOO_TIMEOUT, timedelta(minutes=2), "timeout", "timed out after 120s"),
        ("Socket Timeout", None, "timeout", "timed out after the process group's timeout (Socket Timeout)"),
        ("Tensors must be contiguous", None, "failed", "failed (Tensors must be contiguous)."),
    ],
)  # fmt: skip
def test_message_names_rank_operation_group_and_cause(text, timeout, cause, expected):
    message, kind = describe_collective_failure(
        RuntimeError(text), "broadcast the loss from the last stage", [1, 3], rank=3, timeout=timeout
    )
    assert kind == cause
    assert message.startswith(
        "Global rank 3 could not broadcast the loss from the last stage (a collective over global ranks [1, 3]): "
    )
    assert expected in message
    assert "third_party" not in message and "typically caused" not in message


def test_named_failures_wraps_runtime_errors_only_once():
    with pytest.raises(CollectiveError) as info:
        with named_failures("run the outer step"):
            with named_failures("all-reduce the norm"):
                raise RuntimeError(GLOO_LOST)
    assert info.value.operation == "all-reduce the norm" and info.value.cause == "lost"
    if sys.version_info >= (3, 11):
        assert info.value.__notes__ == ["while trying to run the outer step"]
    assert isinstance(info.value.__cause__, RuntimeError) and not isinstance(info.value.__cause__, CollectiveError)
    # A transfer's own error names its peer already; a caller's mistake is not a collective failure.
    peer_error = PipeCommError("pipeline rank 1 died", rank=0, peer=1, operation="send")
    with pytest.raises(PipeCommError):
        with named_failures("run the schedule"):
            raise peer_error
    with pytest.raises(ValueError):
        with named_failures("run the schedule"):
            raise ValueError("bad argument")


def _run_job(scenario: str, world: int, limit: float) -> tuple[list, dict, float]:
    """Starts every rank as a process; returns exit codes, rank 0's record, and rank 0's wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        procs = [
            subprocess.Popen(
                [sys.executable, str(JOB), str(r), str(world), store, scenario, tmp],
                stdout=open(os.path.join(tmp, f"log{r}"), "w"),
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            for r in range(world)
        ]
        start = time.monotonic()
        try:
            procs[0].wait(limit)
        except subprocess.TimeoutExpired:
            pass
        seconds = time.monotonic() - start
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        logs = "\n".join(Path(tmp, f"log{r}").read_text()[-2000:] for r in range(world))
        record_file = Path(tmp, "rank0.json")
        assert record_file.exists(), f"rank 0 did not finish within {limit:.0f}s:\n{logs}"
        return [p.returncode for p in procs], json.loads(record_file.read_text()), seconds


@pytest.mark.slow
def test_a_rank_dead_before_a_subgroup_all_reduce_is_named_by_the_survivor():
    codes, record, seconds = _run_job("kill-in-subgroup", 3, limit=60)
    assert codes[2] == 17 and codes[1] == 0, codes
    assert record["error"] is not None
    assert record["error"].startswith(
        "Global rank 0 could not all-reduce the gradients over the data-parallel replicas "
        "(a collective over global ranks [0, 2]): lost the connection: a rank of that group died"
    ), record["error"]
    assert record["group_ranks"] == [0, 2] and record["cause"] == "lost" and record["rank"] == 0
    assert record["seconds"] < 10, record


@pytest.mark.slow
def test_a_stalled_rank_in_a_barrier_is_named_after_the_timeout():
    codes, record, seconds = _run_job("stall-in-barrier", 2, limit=60)
    assert record["error"] is not None
    assert record["error"].startswith(
        "Global rank 0 could not wait at the barrier after saving a checkpoint (a collective over global ranks "
        "[0, 1]): timed out after 2s"
    ), record["error"]
    assert "py-spy dump" in record["error"] and "PPStrategy(timeout=...)" in record["error"]
    assert record["cause"] == "timeout" and 1.5 < record["seconds"] < 10, record
