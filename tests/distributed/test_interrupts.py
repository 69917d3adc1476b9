"""Ctrl-C ends a process only while it is stuck waiting on a peer, never after it handled the interrupt.

Each case runs ``interrupt_job.py`` in real processes (rank 1, where there is one,
is a gloo peer), sends SIGINT to rank 0 alone and watches from outside: exit code,
time, output. Every process is killed at the end, whatever happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_pp.distributed.interrupts import blocking_region

JOB = Path(__file__).with_name("interrupt_job.py")
GRACE = 5.0  # install_interrupt_escalation's default


def _start(mode: str, rank: int, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(JOB), mode, str(rank), str(out)],
        stdout=open(out / f"rank{rank}.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # SIGINT reaches only the process it is sent to
    )


def _log(out: Path, rank: int = 0) -> str:
    return (out / f"rank{rank}.log").read_text()


def _interrupt_when_ready(job: subprocess.Popen, out: Path, *, settle: float) -> float:
    """Sends SIGINT to rank 0 once it said ``ready`` (and ``settle`` s later); returns when."""
    deadline = time.monotonic() + 60
    while "ready" not in _log(out) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert "ready" in _log(out) and "installed=True" in _log(out), _log(out)
    time.sleep(settle)  # inside the C++ receive by now (or still in Python's sleep)
    job.send_signal(signal.SIGINT)
    return time.monotonic()


def _wait(job: subprocess.Popen, limit: float) -> int:
    try:
        return job.wait(limit)
    except subprocess.TimeoutExpired:
        return -1


def _run(mode: str, out: Path, *, peer: bool, limit: float, on_signal=None) -> tuple[int, float, str]:
    jobs = [_start(mode, 0, out)] + ([_start(mode, 1, out)] if peer else [])
    try:
        sent = _interrupt_when_ready(jobs[0], out, settle=1.0)
        if on_signal is not None:
            on_signal()
        code = _wait(jobs[0], limit)
        return code, time.monotonic() - sent, _log(out)
    finally:
        (out / "release").write_text("")
        for job in jobs:
            if _wait(job, 5) == -1:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()


@pytest.mark.slow
def test_a_caught_interrupt_outside_any_wait_is_left_alone(tmp_path):
    # Catches KeyboardInterrupt and runs on for 7 s, 4 of them in a blocking region
    # (clean-up that runs a collective): more than the 5 s grace, and never ended.
    code, seconds, log = _run("catch", tmp_path, peer=False, limit=30)
    assert code == 0, (code, log)
    assert "caught" in log and "alive" in log, log
    assert seconds > GRACE + 1, seconds
    assert not (tmp_path / "stopped").exists()


@pytest.mark.slow
def test_a_rank_blocked_in_a_receive_is_ended_after_the_grace(tmp_path):
    code, seconds, log = _run("blocked", tmp_path, peer=True, limit=30)
    assert code == 128 + signal.SIGINT, (code, log)
    assert GRACE - 0.5 <= seconds < GRACE + 10, seconds
    assert "received" not in log and "caught" not in log, log
    assert (tmp_path / "stopped").exists(), "the launched ranks were not stopped first"


@pytest.mark.slow
def test_an_interrupt_delivered_when_the_receive_returns_is_left_to_the_program(tmp_path):
    # SIGINT lands inside the receive; the peer sends 1 s later, the receive returns and
    # Python raises KeyboardInterrupt, which the program catches: it must outlive the grace.
    code, seconds, log = _run(
        "late", tmp_path, peer=True, limit=30, on_signal=lambda: (tmp_path / "signalled").write_text("")
    )
    assert code == 0, (code, log, _log(tmp_path, 1))
    assert "caught" in log and "alive" in log, log
    assert seconds > GRACE + 1, seconds
    assert not (tmp_path / "stopped").exists()


def test_blocking_regions_nest_and_mark_only_the_main_thread():
    import threading

    from lightning_pp.distributed import interrupts

    seen, depth = interrupts._main_regions
    with blocking_region():
        with blocking_region():
            assert interrupts._main_regions == (seen + 2, depth + 2)
        worker = threading.Thread(target=lambda: blocking_region().__enter__())
        worker.start()
        worker.join()
        assert interrupts._main_regions == (seen + 3, depth + 1)
    assert interrupts._main_regions == (seen + 4, depth)
