"""Every way to hold PPStrategy wrong fails with an error that says what to change, never a hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_pp import PPStrategy
from lightning_pp.pipeline.stage import find_pipelined_sequential

from lit_models import LitLM, make_loader, trainer_kwargs
from multirank import RankFailure, run_on_ranks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="zigzag"), "Unknown pipeline schedule 'zigzag'. Choose one of: gpipe, 1f1b, interleaved1f1b"),
        (dict(num_microbatches=0), "num_microbatches must be at least 1"),
        (dict(num_microbatches=-3), "num_microbatches must be at least 1"),
        (dict(pipeline_parallel_size=0), "pipeline_parallel_size must be a positive"),
        (dict(schedule="1F1B", virtual_stages=2), "need schedule='Interleaved1F1B'"),
        (dict(schedule="Interleaved1F1B", virtual_stages=1), "needs virtual_stages >= 2"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPStrategy(**kwargs)


def test_pipeline_size_that_does_not_divide_the_devices_fails_before_launch():
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=3 does not divide the 2 processes"):
        L.Trainer(accelerator="cpu", devices=2, strategy=PPStrategy(pipeline_parallel_size=3), **trainer_kwargs())


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(2, 2))
        self.decoder = nn.Sequential(nn.Linear(2, 2))


def test_sequential_discovery_errors_say_how_to_fix():
    with pytest.raises(ValueError, match=r"several nn.Sequential children \(encoder, decoder\).*sequential='encoder'"):
        find_pipelined_sequential(_Two())
    assert find_pipelined_sequential(_Two(), "decoder")[0] == "decoder"
    with pytest.raises(ValueError, match="found no nn.Sequential among the direct children"):
        find_pipelined_sequential(nn.Module())
    with pytest.raises(ValueError, match=r"sequential='missing'.*missing, not an nn.Sequential"):
        find_pipelined_sequential(_Two(), "missing")


# -- failures inside a run: every rank must stop, none may hang ------------------------------


class OneLayer(LitLM):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 4))


class NoSequential(LitLM):
    def __init__(self):
        super().__init__()
        self.net = nn.ModuleList(list(self.layers))
        del self.layers

    def training_step(self, batch, batch_idx):
        raise AssertionError("never reached")


class SkipsTheSequential(LitLM):
    def training_step(self, batch, batch_idx):
        return sum(p.sum() for p in self.parameters())  # never calls self.layers


class NaNAtSecondBatch(LitLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == 1 else loss


class CallsTwice(LitLM):
    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = self.layers(x)
        return F.cross_entropy(self.layers(x).flatten(0, 1), y.flatten()) + hidden.mean()


class TextBetweenStages(LitLM):
    def __init__(self):
        super().__init__()

        class Tag(nn.Module):
            def forward(self, x):
                return (x, "not a tensor")

        class Untag(nn.Module):
            def forward(self, pair):
                return pair[0]

        self.layers = nn.Sequential(self.layers[0], Tag(), Untag(), *list(self.layers)[1:])


def _fit_and_report(rank, world_size, model_name, num_items_by_rank=None, reraise=False):
    import lightning_pp  # noqa: F401

    model = globals()[model_name]()
    num_items = (num_items_by_rank or {}).get(rank, 16)
    balance = [2, 7] if model_name == "TextBetweenStages" else None
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=PPStrategy(balance=balance), **trainer_kwargs())
    try:
        trainer.fit(model, make_loader(num_items=num_items, batch_size=8))
    except Exception as error:  # noqa: BLE001 - the test inspects it
        if reraise:
            raise
        return f"{type(error).__name__}: {error}"
    return "no error"


SYMMETRIC = {
    "OneLayer": r"ValueError: The pipelined nn.Sequential has 1 layers, fewer than the 2 pipeline stages",
    "NoSequential": r"ValueError: PPStrategy found no nn.Sequential",
    "NaNAtSecondBatch": r"FloatingPointError: The training loss is not finite .* \(epoch 0, batch 1\)",
}


@pytest.mark.slow
@pytest.mark.parametrize("model_name", SYMMETRIC)
def test_errors_every_stage_sees_stop_every_stage(model_name):
    import re

    for message in run_on_ranks(_fit_and_report, 2, model_name, init_process_group=False, timeout=120):
        assert re.search(SYMMETRIC[model_name], message), message


@pytest.mark.slow
def test_stages_with_different_dataloader_lengths_fail_instead_of_hanging():
    messages = run_on_ranks(_fit_and_report, 2, "LitLM", {0: 16, 1: 24}, init_process_group=False, timeout=120)
    for message in messages:
        assert "different numbers of training batches per epoch: [2, 3]" in message, message


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_name, failing_rank, match",
    [
        ("CallsTwice", 1, "The step called self.layers more than once"),
        ("SkipsTheSequential", 0, "The step called self.layers not at all"),
        ("TextBetweenStages", 0, "the output of pipeline stage 0 contains str at \\[1\\]"),
    ],
)
def test_errors_one_stage_sees_end_the_job(model_name, failing_rank, match):
    # The stage that finds the problem raises; its peers' receives fail when it exits.
    with pytest.raises(RankFailure, match=match) as info:
        run_on_ranks(_fit_and_report, 2, model_name, None, True, init_process_group=False, timeout=120)
    assert f"rank {failing_rank} raised" in str(info.value)


def _found_inf_after_unscale(rank, world_size):
    from lightning_pp.parallel.gradients import sync_found_inf

    param = nn.Parameter(torch.ones(2))
    param.grad = torch.tensor([1.0, float("inf") if rank == 1 else 1.0])
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    sync_found_inf(scaler)
    scaler.scale(torch.ones(()))
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    return param.detach().tolist()


def test_fp16_overflow_on_one_stage_skips_the_step_on_every_stage():
    # Without the sync, rank 0 would step (params change) while rank 1 skips.
    assert run_on_ranks(_found_inf_after_unscale, 2) == [[1.0, 1.0], [1.0, 1.0]]


def test_a_model_split_for_one_layout_is_not_reused_under_another():
    from lightning_pp.pipeline.stage import partition_module

    model = LitLM()
    partition_module(model, name=None, num_stages=2, local_stages=[0])
    # Same split again: left as it is (fit, then predict with the same strategy).
    assert partition_module(model, name=None, num_stages=2, local_stages=[0])[1] is model.layers
    # Rank 0 of a 4-stage pipeline holds fewer layers than rank 0 of a 2-stage one.
    with pytest.raises(ValueError, match="already split for another pipeline layout"):
        partition_module(model, name=None, num_stages=4, local_stages=[0])
    with pytest.raises(ValueError, match="already split for another pipeline layout"):
        partition_module(model, name=None, num_stages=2, local_stages=[0], balance=[1, 6])


# -- as a user runs it: `python train.py` with devices=2 (Lightning's launcher) ----------------
JOB = Path(__file__).parents[1] / "pp_job.py"

LAUNCHED = {
    # Every rank would raise these: they are raised once, before any other rank starts.
    "one-layer": "The pipelined nn.Sequential has 1 layers, fewer than the 2 pipeline stages",
    "no-sequential": "PPStrategy found no nn.Sequential",
    "manual": "PPStrategy does not support manual optimization",
    # Raised on every rank after the launch (the network is built in configure_model; the
    # callback comes from configure_callbacks).
    "late-one-layer": "The pipelined nn.Sequential has 1 layers, fewer than the 2 pipeline stages",
    "late-weight-averaging": "WeightAveraging keeps an averaged copy of the whole model",
}


@pytest.mark.slow
@pytest.mark.parametrize("model", LAUNCHED)
def test_a_bad_configuration_ends_with_exit_code_1_and_its_reason_last(model, tmp_path):
    job = subprocess.run(
        [sys.executable, str(JOB), "--out", str(tmp_path), "--model", model],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = [line for line in (job.stdout + job.stderr).strip().splitlines() if line.strip()]
    assert job.returncode == 1, (job.returncode, lines[-20:])
    assert LAUNCHED[model] in "\n".join(lines[-3:]), lines[-20:]
    started = sorted(p.name for p in tmp_path.glob("rank*.json"))
    if not model.startswith("late-"):
        assert started == [], "no rank may start before the check"


def test_manual_optimization_is_refused_before_training():
    class Manual(LitLM):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    strategy = PPStrategy(pipeline_parallel_size=1)
    with pytest.raises(Exception, match="does not support manual optimization"):
        strategy._check_module(Manual(), fitting=True)
    strategy._check_module(Manual(), fitting=False)  # validate and predict need no optimizer


_INLINE = """
import lightning as L
from lit_models import LitLM, make_loader, trainer_kwargs
from lightning_pp import PPStrategy
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=PPStrategy(), **trainer_kwargs())
trainer.fit(LitLM(), make_loader())
print("trained")
"""


@pytest.mark.slow  # a process that imports Lightning: 10-15 s
def test_code_given_with_python_c_is_refused_before_launch():
    # Lightning's launcher would start `python <cwd>/-c` for the second rank ("can't open file").
    job = subprocess.run(
        [sys.executable, "-c", _INLINE],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = job.stdout + job.stderr
    assert job.returncode == 1, out[-2000:]
    assert "there is no script to run again" in out and "torchrun --nproc-per-node 2" in out, out[-2000:]
    assert "can't open file" not in out and "trained" not in out


@pytest.mark.parametrize(
    "argv0, spec, refused",
    [("-c", None, "with python -c"), ("-", None, "on standard input"), ("train.py", None, None), ("", "m", None)],
)
def test_which_main_programs_can_be_run_again(monkeypatch, argv0, spec, refused):
    import __main__
    from lightning_pp.integration.launcher import check_script_can_be_rerun

    monkeypatch.setattr(sys, "argv", [argv0])
    monkeypatch.setattr(__main__, "__spec__", spec, raising=False)  # `python -m package.module` has one
    if refused is None:
        check_script_can_be_rerun(4)
    else:
        with pytest.raises(RuntimeError, match=f"this code was given {refused}.*torchrun --nproc-per-node 4"):
            check_script_can_be_rerun(4)
