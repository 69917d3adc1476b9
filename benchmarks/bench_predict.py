"""Streaming pipelined ``trainer.predict`` against one device, with simulated compute.

Each of the 4 layers sleeps in proportion to its rows (``--layer-ms`` for a whole
batch of 16 rows), so the measurement is about the pipeline (its bubbles, its
communication, Lightning's per-batch work) and not about 2 CPU cores shared by
4 processes. 24 batches of 16 rows, 4 microbatches per batch.

* one device: ``Trainer(devices=1).predict``: every layer of every batch in turn.
* pp=4 streaming (the default ``PPStrategy``): microbatches of the next batch
  enter while the previous one drains; ideal speed-up ``p`` (4.0x) less one
  fill/drain for the whole run.
* pp=4 per batch (``strategy._predict_streaming = False``): one forward-only
  schedule per batch, so every batch pays the bubble: at best
  ``p * m / (m + p - 1)`` (2.3x here).

    python benchmarks/bench_predict.py
    python benchmarks/bench_predict.py --layer-ms 20 --batches 12

* torch pp=4: ``torch.distributed.pipelining``'s ``ScheduleGPipe`` (forward only, under
  ``no_grad``) on the same layers, batch after batch, timed over the whole loop.
* floor pp=4: the same layers streamed with bare ``isend``/``irecv`` and no framework,
  over a bare one-device loop: what this machine allows any library (its wake-ups,
  system calls and sleep overshoot), so a speed-up goal can be read against it.

Prints the wall time of the predict loop (``on_predict_start`` to ``on_predict_end``
on global rank 0) and the speed-up over one device, with the load average (a shared
machine inflates every fixed cost: compare the ratios).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from typing import Any, NamedTuple, Optional

import lightning as L
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader

from _ranks import collect

ROWS = 16
_SPANS: list[tuple[float, float]] = []  # (start, end) of every layer call in this process


class Breakdown(NamedTuple):
    """Where one rank's predict loop went: its layers' sleeps are the compute, the rest is overhead or waiting."""

    loop_s: float
    layers_s: float
    calls: int
    first_s: float  # from the loop's start to this rank's first layer call
    after_s: float  # from this rank's last layer call to the loop's end


class SleepLayer(nn.Module):
    """Stands in for a layer whose cost grows with its rows."""

    def __init__(self, batch_s: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))
        self.batch_s = batch_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        time.sleep(self.batch_s * x.shape[0] / ROWS)
        _SPANS.append((start, time.perf_counter()))
        return x * self.weight


class SleepModel(L.LightningModule):
    def __init__(self, num_layers: int, batch_s: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[SleepLayer(batch_s) for _ in range(num_layers)])

    def predict_step(self, batch, batch_idx):
        return self.layers(batch)


def _rows(args: argparse.Namespace) -> torch.Tensor:
    """The rows every run predicts: ``--batches`` batches of ``ROWS`` rows of 8 features."""
    return torch.arange(args.batches * ROWS * 8, dtype=torch.float32).view(-1, 8)


def _stage_layers(args: argparse.Namespace, rank: int) -> nn.Sequential:
    """The layers pipeline rank ``rank`` holds in the bare runs (``--layers`` split evenly)."""
    per_stage = args.layers // args.pp
    return SleepModel(args.layers, args.layer_ms / 1000).layers[rank * per_stage : (rank + 1) * per_stage]


class LoopTimer(L.Callback):
    def on_predict_start(self, trainer, pl_module):
        trainer.strategy.barrier()
        _SPANS.clear()
        self.start = time.perf_counter()

    def on_predict_end(self, trainer, pl_module):
        end = time.perf_counter()
        self.seconds = end - self.start
        self.breakdown: Optional[Breakdown] = None
        if _SPANS:
            self.breakdown = Breakdown(self.seconds, sum(b - a for a, b in _SPANS), len(_SPANS),
                                       _SPANS[0][0] - self.start, end - _SPANS[-1][1])


def _predict(
    args: argparse.Namespace, devices: int, streaming: bool = True
) -> tuple[float, torch.Tensor, Optional[Breakdown]]:
    from lightning_pp import PPStrategy

    torch.set_num_threads(1)
    model = SleepModel(args.layers, args.layer_ms / 1000)
    loader = DataLoader(_rows(args), batch_size=ROWS)
    strategy: object = "auto"
    if devices > 1:
        balance = [args.layers // devices] * devices
        strategy = PPStrategy(pipeline_parallel_size=devices, num_microbatches=args.m, balance=balance)
        strategy._predict_streaming = streaming  # type: ignore[attr-defined]
    timer = LoopTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, callbacks=[timer], logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    predictions = trainer.predict(model, loader)
    return timer.seconds, torch.cat(predictions) if trainer.is_global_zero else torch.empty(0), timer.breakdown


def _torch_predict(args: argparse.Namespace, rank: int, port: int) -> float:
    """The same layers, batches and microbatches through torch.distributed.pipelining (GPipe, forward only)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.pp)
    try:
        layers = _stage_layers(args, rank)
        example = torch.zeros(ROWS // args.m, 8)
        stage = PipelineStage(layers, rank, args.pp, torch.device("cpu"), input_args=(example,),
                              output_args=(example,))
        schedule = ScheduleGPipe(stage, args.m)
        data = _rows(args)
        with torch.no_grad():
            dist.barrier()
            start = time.perf_counter()
            for batch in data.split(ROWS):
                if rank == 0:
                    schedule.step(batch)
                else:
                    schedule.step()
            dist.barrier()
            return time.perf_counter() - start
    finally:
        dist.destroy_process_group()


def _floor_predict(args: argparse.Namespace, rank: int, port: int) -> tuple[float, float]:
    """What the machine allows: the same layers streamed with bare ``isend``/``irecv``, no library, no Lightning.

    Rank 0 forwards every microbatch in turn and posts the receive of its result
    from the last rank; every other rank waits for its input (the next receive
    posted ahead), forwards it and sends it on. Returns the pipelined seconds and,
    on rank 0, the seconds of a bare one-device loop over the same batches (all
    layers on one rank, while the others wait), so the two compare without any
    framework on either side.
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.pp)
    try:
        last = args.pp - 1
        layers = _stage_layers(args, rank)
        data = _rows(args)
        micro = [part for batch in data.split(ROWS) for part in batch.tensor_split(args.m)]

        def post(src: int, like: torch.Tensor) -> tuple[torch.Tensor, Any]:
            buffer = torch.empty_like(like)
            return buffer, dist.irecv(buffer, src)

        with torch.no_grad():
            dist.barrier()
            start = time.perf_counter()
            sends, results = [], []
            if rank == 0:
                for x in micro:
                    sends.append(dist.isend(layers(x), 1))
                    results.append(post(last, x))
                for _, work in results:
                    work.wait()
            else:
                upcoming = post(rank - 1, micro[0])
                for g in range(len(micro)):
                    x, work = upcoming
                    work.wait()
                    if g + 1 < len(micro):
                        upcoming = post(rank - 1, micro[g + 1])
                    sends.append(dist.isend(layers(x), rank + 1 if rank < last else 0))
            for work in sends:
                work.wait()
            pipelined = time.perf_counter() - start
            single = 0.0
            if rank == 0:
                model = SleepModel(args.layers, args.layer_ms / 1000).layers
                start = time.perf_counter()
                for batch in data.split(ROWS):
                    model(batch)
                single = time.perf_counter() - start
            dist.barrier()
            return pipelined, single
    finally:
        dist.destroy_process_group()


def _rank(rank: int, args: argparse.Namespace, port: int, torch_port: int, floor_port: int, queue: "mp.Queue") -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "RANK": str(rank),
         "LOCAL_RANK": str(rank), "WORLD_SIZE": str(args.pp), "PYTHONWARNINGS": "ignore"}
    )
    torch_seconds = _torch_predict(args, rank, torch_port)
    floor = _floor_predict(args, rank, floor_port)
    modes = ("streaming", "per-batch")
    results: dict = {mode: _predict(args, args.pp, streaming=mode == "streaming") for mode in modes}
    results["torch"] = torch_seconds
    results["floor"] = floor
    queue.put(pickle.dumps((rank, results)))  # by value: shared-memory tensors die with this process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--m", type=int, default=4, help="microbatches per batch")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--layer-ms", type=float, default=40.0, help="one layer's sleep for a whole batch of 16 rows")
    args = parser.parse_args()

    import socket

    ports = []
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args, *ports, queue)) for r in range(args.pp)]
    for p in procs:
        p.start()
    by_rank = dict(pickle.loads(item) for item in collect(queue, procs, args.pp, timeout=600))
    pipelined = by_rank[0]
    for p in procs:
        p.join()
    single, expected, _ = _predict(args, 1)

    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])

    p, m = args.pp, args.m
    print(f"load average before {load_before}, after {load_after} on {os.cpu_count()} cores")
    print(f"{args.batches} batches x {ROWS} rows, {args.layers} layers of {args.layer_ms:.0f} ms per batch, "
          f"pp={p}, m={m}")
    print(f"{'run':22} {'seconds':>8} {'speed-up':>9}  {'same output':>11}")
    print(f"{'one device':22} {single:8.2f} {1.0:8.2f}x")
    for mode in ("streaming", "per-batch"):
        seconds, output, _ = pipelined[mode]
        same = torch.equal(output, expected)
        print(f"{'pp=%d %s' % (p, mode):22} {seconds:8.2f} {single / seconds:8.2f}x  {str(same):>11}")
    torch_seconds = pipelined["torch"]
    print(f"{'torch pp=%d GPipe' % p:22} {torch_seconds:8.2f} {single / torch_seconds:8.2f}x  "
          f"{'(not kept)':>11}")
    floor_seconds, floor_single = pipelined["floor"]
    print(f"{'floor pp=%d' % p:22} {floor_seconds:8.2f} {floor_single / floor_seconds:8.2f}x  "
          f"{'(not kept)':>11}   bare isend/irecv and the same layers, over a bare one-device loop "
          f"({floor_single:.2f} s): what the machine allows")
    print(f"ideal {float(p):.2f}x; a bubble every batch caps it at p*m/(m+p-1) = {p * m / (m + p - 1):.2f}x")
    nominal_ms = args.layer_ms * args.layers / p / m
    print(f"pp={p} streaming, where each rank's loop went (its layers' sleeps are the compute, "
          f"{nominal_ms:.2f} ms per microbatch nominal):")
    for rank in sorted(by_rank):
        b = by_rank[rank]["streaming"][2]
        if b is None:
            continue
        rest = b.loop_s - b.layers_s - b.first_s - b.after_s
        print(f"  rank {rank}: layers {b.layers_s:.3f} s ({1e3 * b.layers_s / b.calls * args.layers / p:.2f} ms per "
              f"microbatch), before its first layer {1e3 * b.first_s:.1f} ms, after its last "
              f"{1e3 * b.after_s:.1f} ms, between them outside the layers {1e3 * rest:.1f} ms "
              "(waiting for inputs, Lightning, data, lightning_pp)")


if __name__ == "__main__":
    sys.exit(main())
