"""A tiny pipelined fit run as a real job: ``python tests/pp_job.py`` or under ``torchrun``.

The failure and multi-node tests launch it the way users launch training
(Lightning's own launcher re-runs this script once per extra device; torchrun
starts one process per rank) and observe the job from outside: exit code, time,
output. Each rank writes ``rank<N>.json`` (pid, losses) into ``--out``, and
``exit<N>.json`` from its last exit hook: how many of the job's process groups
were still alive when the interpreter began to shut down (a gloo group alive
then can abort the process, see ``test_multinode.py``).

Faults, injected on ``--fault-rank``:

* ``--fault-at forward`` (default): in a forward of a layer it holds at step
  ``--fault-step``, so in the middle of a pipeline schedule.
* ``--fault-at save``: just before ``trainer.save_checkpoint`` (needs ``--save``),
  so the other ranks meet the loss inside the checkpoint's collectives.

and of a kind:

* ``kill``: the process dies at once (``os._exit``), like an OOM kill.
* ``stall``: the process sleeps for an hour, alive but silent.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
import weakref
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The checkout under test, whether or not (and wherever) the package is installed.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lit_models import LitLM, make_loader, trainer_kwargs  # noqa: E402


class Report(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out
        self.losses: list[float] = []
        self.groups: list[weakref.ref] = []
        self.rank = 0

    def _write(self, trainer) -> None:
        record = {"pid": os.getpid(), "global_rank": trainer.global_rank, "node_rank": trainer.node_rank,
                  "losses": self.losses, "world_size": trainer.world_size, "global_step": trainer.global_step}
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump(record, handle)

    def on_fit_start(self, trainer, pl_module):
        self.rank = trainer.global_rank
        self._write(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self._write(trainer)

    def on_fit_end(self, trainer, pl_module):
        # Every group the job created (the world, the mesh's axes, CPU twins), watched weakly.
        self.groups = [weakref.ref(group) for group in dist.distributed_c10d._world.pg_map]


def _record_exit(report: Report, out: str) -> None:
    """Registered before the strategy's own exit hook, so it runs after it (atexit is last-in, first-out)."""
    record = {"groups": len(report.groups), "groups_alive_at_exit": sum(ref() is not None for ref in report.groups)}
    with open(os.path.join(out, f"exit{report.rank}.json"), "w") as handle:
        json.dump(record, handle)


def _fault(fault: str, rank: int, where: str) -> None:
    print(f"[pp_job] injecting {fault} on global rank {rank} {where}", file=sys.stderr, flush=True)
    if fault == "kill":
        os._exit(17)
    if fault == "stall":
        time.sleep(3600)


def _inject(model: LitLM, fault: str, rank: int, step: int) -> None:
    def hook(module, inputs):
        trainer = model.trainer
        if trainer.global_rank == rank and trainer.global_step == step:
            _fault(fault, rank, f"at step {step}")

    for layer in model.layers:
        layer.register_forward_pre_hook(hook)


class _OneLayer(LitLM):
    """Fewer layers than stages: every rank would fail in setup."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Embedding(32, 32))


class _NoSequential(LitLM):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(self.layers)


class _Manual(LitLM):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class _LateOneLayer(LitLM):
    """Builds a too-short network in configure_model: the error comes only after the launch."""

    def configure_model(self) -> None:
        self.layers = torch.nn.Sequential(torch.nn.Embedding(32, 32))


class _LateWeightAveraging(LitLM):
    """Brings its own WeightAveraging callback: the launcher cannot see it, every rank refuses it in setup."""

    def configure_callbacks(self):
        from lightning.pytorch.callbacks import WeightAveraging

        return [WeightAveraging()]


MODELS = {"lm": LitLM, "one-layer": _OneLayer, "no-sequential": _NoSequential, "manual": _Manual,
          "late-one-layer": _LateOneLayer, "late-weight-averaging": _LateWeightAveraging}


def main() -> None:
    from lightning_pp import PPStrategy

    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--fault", choices=["none", "kill", "stall"], default="none")
    parser.add_argument("--fault-at", choices=["forward", "save"], default="forward")
    parser.add_argument("--fault-rank", type=int, default=1)
    parser.add_argument("--fault-step", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=None, help="PPStrategy(timeout=...) in seconds")
    parser.add_argument("--save", default=None, help="trainer.save_checkpoint(SAVE) after fit")
    parser.add_argument("--resume", default=None, help="trainer.fit(..., ckpt_path=RESUME)")
    parser.add_argument("--model", choices=sorted(MODELS), default="lm")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    L.seed_everything(0)
    model = MODELS[args.model]()
    report = Report(args.out)
    atexit.register(_record_exit, report, args.out)
    if args.fault != "none" and args.fault_at == "forward":
        _inject(model, args.fault, args.fault_rank, args.fault_step)
    kwargs = {} if args.timeout is None else {"timeout": timedelta(seconds=args.timeout)}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=PPStrategy(pipeline_parallel_size=args.pp, num_microbatches=4, **kwargs),
        callbacks=[report],
        **trainer_kwargs(max_epochs=args.epochs),
    )
    trainer.fit(model, make_loader(num_items=22, batch_size=8, varying=True), ckpt_path=args.resume)
    if args.save:
        if args.fault != "none" and args.fault_at == "save" and trainer.global_rank == args.fault_rank:
            _fault(args.fault, args.fault_rank, "before saving a checkpoint")
        trainer.save_checkpoint(args.save)


if __name__ == "__main__":
    main()
