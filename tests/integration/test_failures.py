"""Failures end the whole job, in bounded time, naming who failed.

The pipelined fit runs as a real job (``tests/pp_job.py`` under Lightning's own
launcher, which re-runs the script for the second rank) and is observed from
outside: exit code, wall time, output, and whether every rank's process is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from multirank import run_on_ranks

pytestmark = pytest.mark.slow

JOB = Path(__file__).parents[1] / "pp_job.py"


def _start(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LOCAL_RANK", None)
    return subprocess.Popen(
        [sys.executable, str(JOB), "--out", str(out), *args],
        stdout=open(out / "job.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=JOB.parent.parent,
        start_new_session=True,  # a stray rank can be killed as a group in cleanup
    )


def _finish(job: subprocess.Popen, out: Path, limit: float) -> tuple[int, float, str]:
    start = time.monotonic()
    try:
        code = job.wait(limit)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        pytest.fail(f"the job did not end within {limit:.0f}s:\n{(out / 'job.log').read_text()[-4000:]}")
    return code, time.monotonic() - start, (out / "job.log").read_text()


def _rank_pids(out: Path) -> list[int]:
    return [json.loads(f.read_text())["pid"] for f in sorted(out.glob("rank*.json"))]


def _wait_until_gone(pids: list[int], limit: float = 15.0) -> list[int]:
    deadline = time.monotonic() + limit
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.2)
    return alive


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent has not reaped it yet


def _wait_for_steps(out: Path, job: subprocess.Popen, steps: int, limit: float = 90.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and job.poll() is None:
        try:
            if len(json.loads((out / "rank0.json").read_text())["losses"]) >= steps and (out / "rank1.json").exists():
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    pytest.fail(f"the job did not reach step {steps}:\n{(out / 'job.log').read_text()[-4000:]}")


def test_a_stage_killed_mid_step_ends_the_job_naming_it(tmp_path):
    job = _start(tmp_path, "--fault", "kill", "--fault-rank", "1", "--fault-step", "1")
    code, _, log = _finish(job, tmp_path, limit=120)
    assert code != 0
    assert "injecting kill on global rank 1" in log
    assert "could not" in log and "pipeline rank 1 (global rank 1) died or closed its connection" in log, log[-3000:]
    assert not _wait_until_gone(_rank_pids(tmp_path))


def test_a_stalled_stage_is_detected_by_the_timeout(tmp_path):
    # A deadline shorter than start-up: a rank that imports Lightning (which imports torchmetrics,
    # which imports transformers when it is installed) can take 12 s on a loaded 2-core machine.
    # The rendezvous has its own allowance, so only the stall trips the deadline.
    job = _start(tmp_path, "--fault", "stall", "--fault-rank", "1", "--fault-step", "1", "--timeout", "8")
    code, seconds, log = _finish(job, tmp_path, limit=150)
    assert code != 0
    assert "PipeCommError" in log, log[-3000:]
    message = next(line for line in log.splitlines() if "PipeCommError:" in line)
    # Who waited, for which peer, doing what, and for how long.
    assert "Pipeline rank 0 (global rank 0) could not" in message
    assert "pipeline rank 1 (global rank 1)" in message and "timed out after 8s" in message
    assert "stage" in message
    # The stalled rank (alive, asleep) is taken down with the job.
    assert not _wait_until_gone(_rank_pids(tmp_path))


def test_ctrl_c_on_the_launcher_stops_every_rank_even_while_one_is_stuck(tmp_path):
    # Rank 1 sleeps inside step 2; rank 0 blocks in a C++ receive that only the 30 min
    # default timeout would end. SIGINT goes to the launching process only.
    job = _start(tmp_path, "--epochs", "50", "--fault", "stall", "--fault-rank", "1", "--fault-step", "2")
    _wait_for_steps(tmp_path, job, 2)
    pids = _rank_pids(tmp_path)
    assert len(pids) == 2
    time.sleep(2.0)  # rank 0 is now blocked waiting for rank 1
    job.send_signal(signal.SIGINT)
    code, seconds, log = _finish(job, tmp_path, limit=30)
    assert code != 0 and seconds < 20, (code, seconds)
    assert not _wait_until_gone(pids), "a rank outlived Ctrl-C"


def test_a_replica_lost_inside_a_checkpoint_save_is_named(tmp_path):
    # dp=2 x pp=1: rank 1 dies just before trainer.save_checkpoint; rank 0 meets the loss in
    # one of the save's collectives (which one depends on how far its sends get).
    job = _start(tmp_path, "--pp", "1", "--save", str(tmp_path / "last.ckpt"), "--fault", "kill", "--fault-at", "save")
    code, seconds, log = _finish(job, tmp_path, limit=120)
    assert code != 0
    assert "injecting kill on global rank 1 before saving a checkpoint" in log
    message = next((line for line in log.splitlines() if "CollectiveError:" in line), None)
    assert message is not None, log[-3000:]
    assert "Global rank 0 could not" in message, message
    assert "a collective over global ranks [0, 1]): lost the connection" in message, message
    # The save is named, in the message or in the note of the call site around it.
    assert "checkpoint" in log[log.index(message):], log[-3000:]
    assert not (tmp_path / "last.ckpt").exists(), "a save that failed must not leave a checkpoint"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".last.ckpt")], "staging left behind"


def test_a_replica_lost_before_the_gradient_all_reduce_is_named(tmp_path):
    # dp=2 x pp=1: no transfers between stages, so rank 0 meets rank 1's death in a collective
    # over the replicas (the finite-loss check or the gradient all-reduce).
    job = _start(tmp_path, "--pp", "1", "--fault", "kill", "--fault-rank", "1", "--fault-step", "1")
    code, seconds, log = _finish(job, tmp_path, limit=120)
    assert code != 0
    assert "injecting kill on global rank 1 at step 1" in log
    message = next((line for line in log.splitlines() if "CollectiveError:" in line), None)
    assert message is not None, log[-3000:]
    assert "Global rank 0 could not" in message and "data-parallel replicas" in message, message
    assert "a collective over global ranks [0, 1]): lost the connection" in message, message


def _silent_peer(rank, world_size):
    import torch.distributed as dist

    from lightning_pp.distributed.p2p import PipeComm, PipeCommError

    comm = PipeComm(dist.group.WORLD, torch.device("cpu"), timeout=timedelta(seconds=1))
    if rank == 0:
        start = time.monotonic()
        try:
            comm.recv(1, what="the input of stage 0, microbatch 5,")
        except PipeCommError as error:
            return {"message": str(error), "seconds": time.monotonic() - start, "peer": error.peer}
        return {"message": None}
    time.sleep(2)  # alive, sends nothing
    return {}


def test_pipecomm_receive_names_both_ends_on_timeout():
    result = run_on_ranks(_silent_peer, 2, timeout=60)[0]
    assert result["message"] is not None
    assert result["peer"] == 1 and result["seconds"] < 3
    assert result["message"].startswith(
        "Pipeline rank 0 (global rank 0) could not receive the input of stage 0, microbatch 5, from pipeline rank 1 "
        "(global rank 1): timed out after 1s"
    )
