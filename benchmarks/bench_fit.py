"""Lightning ``trainer.fit`` with PPStrategy: a training step against the ideal, and where the rest goes.

The model is 4 layers whose forward and backward sleep in proportion to their rows
(as in ``bench_schedules.py``), pp=4, 1F1B (or ``--schedule``), m=8 microbatches of a
batch of 16 rows, SGD, one logged value per step. Each batch is timed on every rank
from ``on_train_batch_start`` to ``on_train_batch_end``, from the third batch on; the
slowest rank's best and median batch count. Printed beside it: the ideal
``(m + p - 1)(F + B)`` of the schedule's plan, and how the step split on that rank:
the schedule itself (executor), sharing the loss and logs of the last stage
(publish), the gradient reduction and Lightning's own per-batch work (rest). And the
first stage's time between two schedules: every other stage waits for its first
forward, so all of it is on the step's critical path.

    python benchmarks/bench_fit.py                     # F/B = 4/8 ms per microbatch
    python benchmarks/bench_fit.py --forward-ms 10 --backward-ms 20
    python benchmarks/bench_fit.py --keep-stale-grads   # the old gradient stash, for its memory

Compare with ``torch.distributed.pipelining`` in ``bench_schedules.py`` (no Lightning
loop there). The load average is printed: a shared machine inflates every fixed cost.
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import sys
import time
import weakref

import lightning as L
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from _ranks import collect  # noqa: E402
from bench_schedules import ROWS, _Clock, _Sleep  # noqa: E402


class _GradSampler(_Clock):
    """Also samples, at every layer's forward and backward, the gradient memory held on this rank.

    Held = this step's gradients in ``.grad`` plus the previous step's, if anything still
    holds them (weak references taken when the batch starts tell). One set of gradients
    is the parameters' size; a stash of the old set during the schedule doubles it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.params: list[torch.Tensor] = []
        self.old: list[weakref.ref] = []
        self.peak_bytes = 0

    def add(self, part: str, start: float) -> None:
        super().add(part, start)
        held = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        held += sum(g.numel() * g.element_size() for g in (ref() for ref in self.old) if g is not None)
        self.peak_bytes = max(self.peak_bytes, held)


_CLOCK = _GradSampler()


class SleepLayer(nn.Module):
    def __init__(self, forward_s: float, backward_s: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))
        self.forward_s, self.backward_s = forward_s, backward_s

    def forward(self, x):
        return _Sleep.apply(x, self.weight, self.forward_s, self.backward_s, _CLOCK)


class SleepModel(L.LightningModule):
    def __init__(self, layers: int, forward_s: float, backward_s: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[SleepLayer(forward_s, backward_s) for _ in range(layers)])

    def training_step(self, batch, batch_idx):
        loss = self.layers(batch.requires_grad_()).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)


class BatchTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.schedule_spans: list[tuple[float, float]] = []  # (start, end) of every schedule this rank ran
        self.parts: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._patch(trainer.strategy)
        _CLOCK.params = [p for p in pl_module.parameters() if p.requires_grad]
        _CLOCK.old = [weakref.ref(p.grad) for p in _CLOCK.params if p.grad is not None]
        _CLOCK.peak_bytes = 0
        self.spent = {"executor": 0.0, "publish": 0.0, "reduce": 0.0}
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self.start)
        self.parts.append(dict(self.spent))
        one_set = sum(p.numel() * p.element_size() for p in _CLOCK.params if p.requires_grad)
        self.grad_sets = max(getattr(self, "grad_sets", 0.0), _CLOCK.peak_bytes / max(one_set, 1))

    def _patch(self, strategy) -> None:
        """Times the strategy's pieces (the benchmark's own instrumentation, not the package's)."""
        if getattr(strategy, "_bench_timed", False):
            return
        strategy._bench_timed = True
        timer = self

        def timed(name, part):
            method = getattr(strategy, name)

            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    timer.spent[part] += time.perf_counter() - start

            setattr(strategy, name, wrapper)

        original_executor = strategy._executor

        def executor(schedule):
            ex = original_executor(schedule)
            run = ex.run

            def timed_run(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return run(*args, **kwargs)
                finally:
                    end = time.perf_counter()
                    timer.spent["executor"] += end - start
                    timer.schedule_spans.append((start, end))

            ex.run = timed_run
            return ex

        strategy._executor = executor
        timed("_publish_both", "publish")
        timed("_reduce_gradients", "reduce")


def _fit(args: argparse.Namespace) -> dict:
    from lightning_pp import PPStrategy

    torch.set_num_threads(1)
    f_s, b_s = args.forward_ms * args.m / 1000, args.backward_ms * args.m / 1000
    model = SleepModel(args.pp, f_s, b_s)
    data = torch.randn(args.batches * ROWS, 8)
    loader = DataLoader(data, batch_size=ROWS)
    strategy = PPStrategy(pipeline_parallel_size=args.pp, num_microbatches=args.m, schedule=args.schedule)
    if args.keep_stale_grads:  # the behaviour before: the old gradients stay stashed during the schedule
        strategy._grads_will_be_zeroed = lambda trainer: False  # type: ignore[method-assign]
    timer = BatchTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=args.pp, strategy=strategy, callbacks=[timer], logger=False, max_epochs=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(model, loader)
    spans = timer.schedule_spans[2:]
    between = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    return {"seconds": timer.seconds[2:], "parts": timer.parts[2:], "grad_sets": timer.grad_sets, "between": between}


def _rank(rank: int, args: argparse.Namespace, port: int, queue: "mp.Queue") -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "RANK": str(rank),
         "LOCAL_RANK": str(rank), "WORLD_SIZE": str(args.pp), "PYTHONWARNINGS": "ignore"}
    )
    queue.put(pickle.dumps((rank, _fit(args))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--batches", type=int, default=14)
    parser.add_argument("--forward-ms", type=float, default=4.0, help="forward sleep per microbatch")
    parser.add_argument("--backward-ms", type=float, default=8.0, help="backward sleep per microbatch")
    parser.add_argument("--keep-stale-grads", action="store_true",
                        help="stash the previous step's gradients during the schedule, as before (for comparison)")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args, port, queue)) for r in range(args.pp)]
    for p in procs:
        p.start()
    per_rank = dict(pickle.loads(item) for item in collect(queue, procs, len(procs), timeout=900))
    for p in procs:
        p.join()
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])

    from lightning_pp.pipeline.schedules import build_schedule, simulate

    p, m = args.pp, args.m
    planned = simulate(build_schedule(args.schedule, p, m), forward_time=args.forward_ms / 1000,
                       backward_time=args.backward_ms / 1000)
    ideal = max(e.end for events in planned for e in events)
    slow = max(range(p), key=lambda r: statistics.median(per_rank[r]["seconds"]))
    seconds = per_rank[slow]["seconds"]
    best, median = min(seconds), statistics.median(seconds)
    print(f"load average before {load_before}, after {load_after} on {os.cpu_count()} cores")
    print(f"fit {args.schedule} pp={p} m={m} F={args.forward_ms:g}ms B={args.backward_ms:g}ms per microbatch, "
          f"{len(seconds)} timed batches")
    print(f"step best {best * 1000:.1f} ms, median {median * 1000:.1f} ms; ideal {ideal * 1000:.0f} ms; "
          f"efficiency {ideal / best:.3f} (best), {ideal / median:.3f} (median)")
    sets = [round(per_rank[r]["grad_sets"], 2) for r in range(p)]
    print(f"peak gradient memory during a step, in sets of this rank's gradients, by rank: {sets}")
    between = per_rank[0]["between"]
    print(f"first stage, from the end of one schedule to the start of the next (loss and logs, optimizer, "
          f"Lightning's batch loop): median {statistics.median(between) * 1000:.2f} ms")
    for r in range(p):
        times = per_rank[r]["seconds"]
        parts = per_rank[r]["parts"][times.index(min(times))]
        rest = min(times) - sum(parts.values())
        print(f"rank {r} best step {min(times) * 1000:.1f} ms: "
              + ", ".join(f"{k} {v * 1000:.1f}" for k, v in parts.items())
              + f", rest (Lightning, optimizer, hooks) {rest * 1000:.1f}")


if __name__ == "__main__":
    sys.exit(main())
