"""A stage that stalls during streaming ``trainer.predict`` fails the job within ``PPStrategy(timeout=...)``.

The streaming pipeline used to carry its own 30-minute deadline; every wait now
takes the strategy's, and the failure that surfaces is the transfer's own,
naming both ranks, not a wrapper.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_pp.pipeline.streaming import StreamingPipeline

from lit_models import LitLM, make_loader, trainer_kwargs
from multirank import run_on_ranks

TIMEOUT = timedelta(seconds=5)


class Released(Exception):
    """Ends the stall once the test has seen the other rank fail."""


class StallingLM(LitLM):
    """Global rank ``stall_rank`` stalls (alive, silent) in its first predict forward."""

    def __init__(self, stall_rank: int, signals: str) -> None:
        super().__init__()
        self.stall_rank, self.signals = stall_rank, Path(signals)
        self.layers[-1].register_forward_pre_hook(self._stall)

    def _stall(self, module, inputs):
        if not self.trainer.predicting or self.trainer.global_rank != self.stall_rank:
            return
        (self.signals / "stalled").write_text(repr(time.time()))
        deadline = time.monotonic() + 120
        while not (self.signals / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise Released()

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return self.layers(x)


def _rank(rank: int, world_size: int, signals: str) -> dict:
    from lightning_pp import PPStrategy

    L.seed_everything(0)
    model = StallingLM(stall_rank=1, signals=signals)
    strategy = PPStrategy(pipeline_parallel_size=2, num_microbatches=2, timeout=TIMEOUT)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=strategy, **trainer_kwargs())
    try:
        trainer.predict(model, make_loader(num_items=16, batch_size=4))
        return {"outcome": "finished"}
    except Released:
        return {"outcome": "released"}
    except Exception as error:  # noqa: BLE001 - observed by the test
        failed_at = time.time()
        stalled = Path(signals, "stalled")
        stalled_at = float(stalled.read_text()) if stalled.exists() else None
        return {
            "outcome": "failed",
            "type": type(error).__name__,
            "message": str(error),
            "after": None if stalled_at is None else failed_at - stalled_at,
        }
    finally:
        if rank != 1:
            Path(signals, "release").write_text("")


@pytest.mark.slow
def test_a_stage_stalled_during_predict_fails_within_the_strategy_timeout(tmp_path):
    first, stalled = run_on_ranks(_rank, 2, os.fspath(tmp_path), init_process_group=False, timeout=120)
    assert stalled["outcome"] == "released", stalled
    assert first["outcome"] == "failed", first
    # The transfer's own error: who waited, for which peer, and how long.
    assert first["type"] == "PipeCommError", first
    assert "Pipeline rank 0 (global rank 0) could not" in first["message"], first["message"]
    assert "pipeline rank 1 (global rank 1)" in first["message"] and "timed out after 5s" in first["message"]
    assert first["after"] is not None and 4.0 <= first["after"] < 20.0, first["after"]


class _SilentComm:
    """A channel whose receives never return and never fail (a transport without a deadline)."""

    def __init__(self, timeout: timedelta) -> None:
        self.timeout = timeout
        self.sends_never_block = False
        self.release = threading.Event()

    def send(self, payload, dst, *, where="", wait=True):
        pass

    def wait_sends(self):
        pass

    def recv(self, src, *, what=""):
        self.release.wait(60)
        raise RuntimeError("released by the test")


@pytest.mark.parametrize("given", [None, timedelta(seconds=1)], ids=["comm's", "caller's"])
def test_the_streaming_waits_end_after_the_callers_deadline_without_progress(given):
    # Rank 0 of two: it waits for the result of microbatch 0 from a peer that never answers.
    comm = _SilentComm(timedelta(seconds=1) if given is None else timedelta(minutes=30))
    pipe = StreamingPipeline(
        torch.nn.Identity(),
        0,
        2,
        comm,
        exists=lambda g: g < 1,
        launch=lambda g: torch.zeros(1),
        finish=lambda g, a: a,
        on_result=lambda g, r: None,
        timeout=given,
    )
    assert pipe.timeout == timedelta(seconds=1)
    start = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=r"no progress .* at most 1 s \(PPStrategy\(timeout=\.\.\.\)\)"):
            pipe.run_until(pipe.completion_tick(0))
    finally:
        comm.release.set()
    # One transfer's deadline plus the margin that lets a transfer's own error come first.
    assert 1.5 <= time.monotonic() - start < 5
