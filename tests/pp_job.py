"""A tiny pipelined fit run as a real job: ``python tests/pp_job.py`` or under ``torchrun``.

The failure and multi-node tests launch it the way users launch training
(Lightning's own launcher re-runs this script once per extra device; torchrun
starts one process per rank) and observe the job from outside: exit code, time,
output. Each rank writes ``rank<N>.json`` (pid, losses) into ``--out``.

Faults, injected in a forward of a layer held by ``--fault-rank`` at step
``--fault-step`` (so in the middle of a pipeline schedule):

* ``kill``: the process dies at once (``os._exit``), like an OOM kill.
* ``stall``: the process sleeps for an hour, alive but silent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from models import LitLM, make_loader, trainer_kwargs  # noqa: E402


class Report(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out
        self.losses: list[float] = []

    def _write(self, trainer) -> None:
        record = {"pid": os.getpid(), "global_rank": trainer.global_rank, "node_rank": trainer.node_rank,
                  "losses": self.losses, "world_size": trainer.world_size}
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump(record, handle)

    def on_fit_start(self, trainer, pl_module):
        self._write(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self._write(trainer)


def _inject(model: LitLM, fault: str, rank: int, step: int) -> None:
    def hook(module, inputs):
        trainer = model.trainer
        if trainer.global_rank != rank or trainer.global_step != step:
            return
        print(f"[pp_job] injecting {fault} on global rank {rank} at step {step}", file=sys.stderr, flush=True)
        if fault == "kill":
            os._exit(17)
        if fault == "stall":
            time.sleep(3600)

    for layer in model.layers:
        layer.register_forward_pre_hook(hook)


def main() -> None:
    from lightning_pp import PPStrategy

    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--fault", choices=["none", "kill", "stall"], default="none")
    parser.add_argument("--fault-rank", type=int, default=1)
    parser.add_argument("--fault-step", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=None, help="PPStrategy(timeout=...) in seconds")
    parser.add_argument("--save", default=None, help="trainer.save_checkpoint(SAVE) after fit")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    L.seed_everything(0)
    model = LitLM()
    if args.fault != "none":
        _inject(model, args.fault, args.fault_rank, args.fault_step)
    kwargs = {} if args.timeout is None else {"timeout": timedelta(seconds=args.timeout)}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=PPStrategy(pipeline_parallel_size=args.pp, num_microbatches=4, **kwargs),
        callbacks=[Report(args.out)],
        **trainer_kwargs(max_epochs=args.epochs),
    )
    trainer.fit(model, make_loader(num_items=22, batch_size=8, varying=True))
    if args.save:
        trainer.save_checkpoint(args.save)


if __name__ == "__main__":
    main()
