"""Two torchrun "nodes" on one machine (loopback rendezvous), one pipeline spanning both.

Each node is its own ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank R`` with a
static rendezvous at 127.0.0.1, exactly as on two machines (there, ``--master-addr``
is node 0's address). The job trains ``tests/pp_job.py`` with pp=2, so stage 0 runs
on node 0 and stage 1 on node 1, saves a checkpoint, and a second two-node job
resumes from it: every per-step loss must equal one-device training.

NOTE: a job that saved a checkpoint used to abort at interpreter exit about one run
in seven under CPU load ("terminate called without an active exception", SIGABRT,
with the checkpoint already committed), and torchrun on the *other* node then waited
out its exit barrier (300 s). Cause: the save ends with a broadcast and, at once,
Lightning's barrier; a gloo worker thread then deletes the finished broadcast (the
barrier held a weak reference to it) and must take the GIL to free its
Python-created tensors. When that happens after interpreter shutdown has begun,
CPython ends the thread with ``pthread_exit``, and unwinding through the noexcept
``~AsyncWork`` calls ``std::terminate``. The exit hook must therefore destroy every
process group (joining their worker threads) while the interpreter still runs:
``test_every_process_group_is_released_before_interpreter_exit`` checks that
deterministically, where the abort itself needs luck to show.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_models import LitLM, make_loader, trainer_kwargs
from multirank import free_port

pytestmark = pytest.mark.slow

JOB = Path(__file__).parents[1] / "pp_job.py"


def _two_nodes(out: Path, *job_args: str, limit: float = 120.0) -> tuple[list[int], list[float], str]:
    """Runs pp_job.py as two single-process torchrun nodes; returns exit codes, seconds to each exit, logs."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    nodes = []
    start = time.monotonic()
    for node_rank in (0, 1):
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank),
            "--master-addr", "127.0.0.1", "--master-port", port,
            str(JOB), "--devices", "1", "--num-nodes", "2", "--pp", "2", "--out", str(out), *job_args,
        ]  # fmt: skip
        log = open(out / f"node{node_rank}.log", "w")
        nodes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    codes: list = [None, None]
    seconds = [limit, limit]
    try:
        while time.monotonic() - start < limit and None in codes:
            for i, node in enumerate(nodes):
                if codes[i] is None and node.poll() is not None:
                    codes[i], seconds[i] = node.returncode, time.monotonic() - start
            time.sleep(0.2)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    logs = "\n".join(f"--- node {r} ---\n" + (out / f"node{r}.log").read_text()[-3000:] for r in (0, 1))
    return codes, seconds, logs


def _one_device_reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    """Two epochs on one device: per-step losses, and the weights after epoch 1."""

    class AfterEpochOne(L.Callback):
        state: dict[str, torch.Tensor] = {}

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    L.seed_everything(0)
    model = LitLM()
    after = AfterEpochOne()
    trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=[after], **trainer_kwargs(max_epochs=2))
    trainer.fit(model, make_loader(num_items=22, batch_size=8, varying=True))
    return model.step_losses, after.state


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_pipeline_across_two_torchrun_nodes_saves_and_resumes(tmp_path):
    from lightning_pp import consolidate_checkpoint

    losses, epoch_one = _one_device_reference()
    assert len(losses) == 6
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    checkpoint = tmp_path / "epoch1.ckpt"

    codes, _, logs = _two_nodes(first, "--save", str(checkpoint))
    assert codes == [0, 0], logs
    assert "terminate called" not in logs, logs
    ranks = _ranks(first)
    assert [(r["global_rank"], r["node_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    for r in ranks:
        torch.testing.assert_close(r["losses"], losses[:3], rtol=1e-5, atol=1e-6)
    # Node 0 wrote stage 0, node 1 stage 1: together the one-device weights.
    saved = consolidate_checkpoint(checkpoint)["state_dict"]
    assert sorted(saved) == sorted(epoch_one)
    for name, value in epoch_one.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")

    codes, _, logs = _two_nodes(second, "--resume", str(checkpoint), "--epochs", "2")
    assert codes == [0, 0], logs
    for r in _ranks(second):
        # Epoch 2 only, momentum buffers and step counters restored from the checkpoint.
        torch.testing.assert_close(r["losses"], losses[3:], rtol=1e-5, atol=1e-6)
        assert r["global_step"] == 6


def test_a_dead_node_ends_the_other_in_bounded_time(tmp_path):
    # Node 0 also hosts the rendezvous store: losing it is the harder case for node 1.
    codes, seconds, logs = _two_nodes(
        tmp_path, "--fault", "kill", "--fault-rank", "0", "--fault-step", "1", "--timeout", "60", limit=90
    )
    assert codes[0] not in (None, 0) and codes[1] not in (None, 0), (codes, logs)
    # Far less than the 60 s timeout: a closed connection is noticed at once.
    assert max(seconds) < 45, (seconds, logs)
    assert "injecting kill on global rank 0" in logs
    assert "pipeline rank 0 (global rank 0) died or closed its connection" in logs, logs


def test_every_process_group_is_released_before_interpreter_exit(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    job = subprocess.run(
        [sys.executable, str(JOB), "--out", str(tmp_path), "--save", str(tmp_path / "last.ckpt")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"exit{rank}.json").read_text())
        # The world, the mesh's axes: a group alive at shutdown keeps gloo worker threads
        # that may still need the GIL.
        assert record["groups"] >= 2
        assert record["groups_alive_at_exit"] == 0, (rank, record)
