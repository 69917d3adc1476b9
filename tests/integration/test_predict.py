"""Streaming pipelined ``trainer.predict`` against one device.

Pure logic first (the ring exchange order, its replay under blocking sends, the
read-ahead feed, the data-parallel regrouping), then real gloo ranks: every case
compares global rank 0's returned predictions and the prediction writer's calls
with a one-device run of the same module. Several cases share one spawn to keep
the suite fast on 2 cores.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from lightning_pp.integration.predict_stream import (
    PredictFeed,
    gather_replica_predictions,
)
from lightning_pp.pipeline.streaming import (
    RingDeadlock,
    StreamingPipeline,
    Transfer,
    replay_ring,
    ring_exchange,
)

from blocking import RendezvousTransport
from compare import assert_same
from lit_models import LitLM, TokensOnly, make_loader, trainer_kwargs
from multirank import run_on_ranks


# -- pure logic --------------------------------------------------------------------------------
def test_ring_exchange_orders_by_parity():
    always = lambda g: True  # noqa: E731
    # pp=3, tick 5: rank 0 sends microbatch 5 on and receives the result of 3;
    # odd rank 1 receives before it sends; rank 2 (last, even) sends the result first.
    assert ring_exchange(0, 3, 5, always) == (
        Transfer("send", "activation", 1, 5),
        Transfer("recv", "result", 2, 3),
    )
    assert ring_exchange(1, 3, 5, always) == (
        Transfer("recv", "activation", 0, 5),
        Transfer("send", "activation", 2, 4),
    )
    assert ring_exchange(2, 3, 5, always) == (
        Transfer("send", "result", 0, 3),
        Transfer("recv", "activation", 1, 4),
    )
    # Fill and drain: nothing is sent for microbatches that do not exist.
    assert ring_exchange(2, 3, 0, always) == ()
    assert ring_exchange(0, 3, 5, lambda g: g < 4) == (Transfer("recv", "result", 2, 3),)
    assert ring_exchange(0, 1, 5, always) == ()


@pytest.mark.parametrize("pp_size", [1, 2, 3, 4, 5, 8])
def test_ring_completes_under_blocking_sends(pp_size):
    for m in range(12):
        transfers = replay_ring(pp_size, m)
        # each microbatch: pp_size - 1 activations and one result (none with one stage)
        assert transfers == (m * pp_size if pp_size > 1 else 0)


@pytest.mark.parametrize("pp_size", [2, 3, 4])
def test_all_send_first_ring_deadlocks(pp_size):
    """The SGLang XPU livelock, reproduced on paper: the replay must catch it."""
    with pytest.raises(RingDeadlock, match="no transfer can complete"):
        replay_ring(pp_size, 4, parity=False)


def test_feed_reads_ahead_and_yields_every_batch_once_in_order():
    batches = [torch.full((2,), i) for i in range(5)]
    feed = PredictFeed(batches)
    it = iter(feed)
    assert int(next(it)[0]) == 0
    assert int(feed.get(0)[0]) == 0
    assert int(feed.get(3)[0]) == 3  # ahead of Lightning
    assert [int(b[0]) for b in it] == [1, 2, 3, 4]
    assert feed.get(5) is None
    assert len(feed._batches) == 1  # batch 4: delivered, not yet taken by the pipeline
    feed.limit = 2
    it = iter(feed)
    assert feed.get(2) is None and feed.get(1) is not None
    assert len(list(it)) == 2


def test_regrouping_replicas_drops_padding_and_restores_order():
    rows = torch.arange(7.0).unsqueeze(1)
    # Replica 0 has dataset items 0, 2, 4, 6; replica 1 has 1, 3, 5 and 0 again (padding).
    r0 = ([rows[[0, 2]], rows[[4, 6]]], [[0, 2], [4, 6]])
    r1 = ([rows[[1, 3]], rows[[5, 0]]], [[1, 3], [5, 0]])
    merged = gather_replica_predictions([r0, r1], batch_size=3)
    assert [m.flatten().tolist() for m in merged] == [[0, 1, 2], [3, 4, 5], [6]]
    dicts = gather_replica_predictions([([{"a": rows[[1, 0]]}], [[1, 0]])], batch_size=None)
    assert dicts[0]["a"].flatten().tolist() == [0, 1]
    ragged = ([torch.zeros(1, 2), torch.zeros(1, 3)], [[0], [1]])
    with pytest.raises(ValueError, match="do not concatenate in dim 0"):  # never a silent fallback
        gather_replica_predictions([ragged], batch_size=2)


class _RecordingPlatform:
    """Pins and copies like a device platform, and records when it was asked to."""

    def __init__(self) -> None:
        self.calls: list = []

    def pin(self, tensor):
        self.calls.append(("pin", tensor.shape[0]))
        return tensor

    def to_device(self, tensor, device):
        assert tensor is not None
        self.calls.append(("to_device", tensor.shape[0]))
        return tensor.clone()


class _Pipelined(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.handler = None

    def forward(self, x):
        return self.handler(x)


def test_inputs_stay_on_the_host_until_their_microbatch_launches():
    from lightning_pp.integration.predict_stream import PredictStream

    platform = _RecordingPlatform()
    stage, pipelined = torch.nn.Linear(3, 2), _Pipelined()
    batches = [torch.randn(5, 3), torch.randn(2, 3)]
    feed = PredictFeed(batches)
    iter(feed)
    launched = []

    def user_step(microbatch, batch_idx):
        launched.append((batch_idx, microbatch.shape[0], len(platform.calls)))
        return pipelined(microbatch)

    stream = PredictStream(
        feed, stage=stage, pipelined=pipelined, user_step=user_step, step_args=lambda k: (k,), prepare=lambda b: b,
        num_microbatches=2, pp_rank=0, pp_size=1, comm=None, device=torch.device("cpu"), platform=platform,
        sequential_name="self.layers",
    )
    with torch.inference_mode():
        outputs = [stream.step(0), stream.step(1)]
    for output, batch in zip(outputs, batches):
        torch.testing.assert_close(output, stage(batch))
        assert not output.requires_grad
    # Each microbatch is pinned when read and copied right before its step runs.
    assert platform.calls == [("pin", 3), ("pin", 2), ("to_device", 3), ("to_device", 2), ("pin", 1), ("pin", 1),
                              ("to_device", 1), ("to_device", 1)]
    assert [(k, rows) for k, rows, _ in launched] == [(0, 3), (0, 2), (1, 1), (1, 1)]
    with pytest.raises(RuntimeError, match="expected batch 2"):
        stream.step(3)


@pytest.mark.parametrize("pp_size", [2, 3, 4])
def test_overlapped_ring_completes_under_blocking_sends(pp_size):
    for m in range(10):
        assert replay_ring(pp_size, m, lag=2) == m * pp_size


class _RecordingComm:
    """A channel that records the order of one rank's sends and receives."""

    def __init__(self, sends_never_block: bool) -> None:
        self.sends_never_block = sends_never_block
        self.timeout = None
        self.log: list[str] = []

    def send(self, payload, dst, *, where="", wait=True):
        self.log.append("send")

    def recv(self, src, *, what=""):
        self.log.append("recv")
        return torch.zeros(1)

    def wait_sends(self):
        self.log.append("|")  # an exchange ends


@pytest.mark.parametrize("sends_never_block", [True, False])
def test_an_odd_rank_sends_first_only_where_a_posted_send_cannot_block(sends_never_block):
    # The last of two ranks (odd) sends the result of microbatch g and receives g + 1 in one
    # exchange. Receiving first is what keeps a ring of blocking sends (XCCL) from
    # deadlocking; where sends cannot block (gloo) it would only hold the result back.
    comm = _RecordingComm(sends_never_block)
    pipe = StreamingPipeline(
        torch.nn.Identity(), 1, 2, comm, exists=lambda g: g < 3, launch=lambda g: None,
        finish=lambda g, activation: activation, on_result=lambda g, result: None, overlap=False,
    )
    pipe.run_until(pipe.completion_tick(2))
    both = [e for e in "".join(comm.log).replace("send", "s").replace("recv", "r").split("|") if len(e) == 2]
    assert both == (["sr", "sr"] if sends_never_block else ["rs", "rs"])
    assert replay_ring(2, 3) == 6  # the order used under blocking sends completes


# -- models and data -----------------------------------------------------------------------------


class PredictLM(LitLM):
    def __init__(self, output: str = "probs") -> None:
        super().__init__()
        self.output = output

    def predict_step(self, batch, batch_idx):
        if self.output == "probs":  # a tensor batch, no labels: the example
            return self.layers(batch).softmax(-1)
        x, y = batch
        logits = self.layers(x)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        return {"argmax": logits.argmax(-1), "nll": nll}


class RecordingWriter(BasePredictionWriter):
    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.calls: list = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.calls.append((batch_idx, list(batch_indices), prediction))


CASES = {
    # no labels, short last batch (6 rows), 8 and 6 rows in 3 microbatches
    "no-labels-uneven": dict(output="probs", items=22, batch_size=8, m=3),
    # (x, y) batches whose sequence length changes per batch, dict output, 6 rows in 4
    "varying-shapes": dict(output="dict", items=22, batch_size=8, m=4, varying=True),
    # batches smaller than the pipeline is deep: read-ahead spans several batches
    "tiny-batches": dict(output="probs", items=7, batch_size=2, m=4),
}


def _loader(case: dict) -> DataLoader:
    if case["output"] == "probs":
        return DataLoader(TokensOnly(case["items"]), batch_size=case["batch_size"])
    return make_loader(case["items"], case["batch_size"], varying=case.get("varying", False))


def _predict(case: dict, devices: int, strategy, sampler: bool = False) -> dict:
    L.seed_everything(0)
    model = PredictLM(case["output"])
    writer = RecordingWriter()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, callbacks=[writer],
        **trainer_kwargs(use_distributed_sampler=sampler),
    )
    predictions = trainer.predict(model, _loader(case))
    return {"predictions": predictions, "writes": writer.calls}


def _pp_rank(rank: int, world_size: int, pp: int, runs: list) -> dict:
    from lightning_pp import PPStrategy

    out = {}
    for name, blocking in runs:
        case = CASES[name]
        transport = RendezvousTransport(timeout=30) if blocking else None
        strategy = PPStrategy(pipeline_parallel_size=pp, num_microbatches=case["m"], transport=transport)
        out[(name, blocking)] = _predict(case, world_size, strategy, sampler=world_size > pp)
        if blocking:
            out[(name, blocking)]["sends"] = transport.num_sends
    return out


_REFERENCES: dict = {}


def _reference(name: str) -> dict:
    if name not in _REFERENCES:
        _REFERENCES[name] = _predict(CASES[name], 1, "auto")
    return _REFERENCES[name]


def _check_pipeline(results: list[dict], pp: int, runs: list) -> None:
    for key in runs:
        name, blocking = key
        ref = _reference(name)
        first = results[0][key]
        assert_same(first["predictions"], ref["predictions"])
        # The writer saw each batch once, in order, with its dataset indices and output.
        assert_same(first["writes"], ref["writes"])
        for rank in range(1, pp):
            assert results[rank][key]["writes"] == [], f"rank {rank} wrote predictions it does not hold"
        if blocking:
            assert all(r[key]["sends"] > 0 for r in results)


pytestmark = pytest.mark.slow

PP2_RUNS = [("no-labels-uneven", False), ("varying-shapes", False), ("tiny-batches", False), ("varying-shapes", True)]
PP3_RUNS = [("no-labels-uneven", True), ("varying-shapes", True), ("tiny-batches", True), ("varying-shapes", False)]


def test_two_stages_match_one_device():
    _check_pipeline(run_on_ranks(_pp_rank, 2, 2, PP2_RUNS, init_process_group=False, timeout=150), 2, PP2_RUNS)


def test_three_stages_match_one_device_under_blocking_and_posted_sends():
    """Odd pp: the ring's wrap-around edge joins two even ranks; sends wait for receivers, then gloo's posted sends."""
    _check_pipeline(run_on_ranks(_pp_rank, 3, 3, PP3_RUNS, init_process_group=False, timeout=180), 3, PP3_RUNS)


def test_four_stages_with_blocking_sends_match_one_device():
    runs = [("varying-shapes", True)]
    _check_pipeline(run_on_ranks(_pp_rank, 4, 4, runs, init_process_group=False, timeout=180), 4, runs)


def test_two_replicas_of_two_stages_return_one_device_predictions():
    runs = [("no-labels-uneven", False), ("tiny-batches", False)]
    results = run_on_ranks(_pp_rank, 4, 2, runs, init_process_group=False, timeout=180)
    for key in runs:
        ref = _reference(key[0])
        assert_same(results[0][key]["predictions"], ref["predictions"])
        # Each replica's first stage (ranks 0 and 1: the pipeline axis is outermost) wrote
        # its own shard, each dataset row once over both.
        written = [i for rank in (0, 1) for _, indices, _ in results[rank][key]["writes"] for i in indices]
        assert sorted(written) == list(range(CASES[key[0]]["items"]))
        assert results[2][key]["writes"] == results[3][key]["writes"] == []
