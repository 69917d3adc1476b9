"""Block-list models (a Hugging Face GPT-2 with its tied head) through the rest of Lightning, against one device.

``tests/integration/test_block_lists.py`` shows that Hugging Face models and a user's
``ModuleList`` loop train and predict as on one device under the default 1F1B
schedule. This file covers everything else a user does with such a model, at pp=2,
in ONE two-rank job (CI time) whose every rank runs, one after the other:

1. ``fit`` one epoch (1F1B, ``gradient_clip_val`` small enough to clip every step),
   ``ModelCheckpoint`` saving at the epoch's end, then ``predict``;
2. a fresh model resumed from that checkpoint with ``ckpt_path=`` for epoch two under
   ``Interleaved1F1B`` (four virtual stages: each rank now holds other blocks than the
   ones it saved), clipping, then ``predict``;
3. one epoch each of ``GPipe`` and ``ZBH1``, clipping;
4. one epoch of ``bf16-mixed``;
5. an ``nn.Sequential`` whose head is tied to its embedding (first and last stage):
   saved, and resumed from the one-device checkpoint.

The one-device reference runs the same module with ``strategy="auto"``. The saved
checkpoint is consolidated into one file and compared, name by name, with the plain
Lightning checkpoint one device writes at the same point; the unchanged module loads it.
A checkpoint written at pp=2 also resumes on one rank under ``PPStrategy`` (another
pipeline size). Predictions go through the streaming predict path.

Errors specific to block lists are checked in one process, without a pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lit_models import LabelledIds, TiedLM, make_loader, trainer_kwargs
from multirank import run_on_ranks

VOCAB, SEQ, DIM, LAYERS = 48, 8, 32, 4
#: Small enough that the global gradient norm exceeds it at every step (checked on one device).
CLIP = 0.3
RTOL, ATOL = 1e-5, 1e-6


def Ids(num_items: int = 20, seed: int = 0) -> LabelledIds:
    return LabelledIds(VOCAB, SEQ, num_items, seed)


class GPT2LM(L.LightningModule):
    """The issue's module: a Hugging Face GPT-2 (lm_head tied to the token embedding), unchanged."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=DIM, n_layer=LAYERS, n_head=2, n_positions=32,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        self.model = transformers.GPT2LMHeadModel(config)

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], labels=batch["labels"])
        self.log("train_loss", out.loss)
        return out.loss

    def predict_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"]).logits

    def configure_optimizers(self):
        # SGD with momentum: optimizer state to save and resume. A scheduler that steps every
        # epoch: its state, and the learning rate of the resumed epoch, come from the checkpoint.
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


class Record(L.Callback):
    """Per step: the loss Lightning saw and, before clipping, the global gradient norm."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.model_norms: list[float] = []  # under PPStrategy: its norm of every stage's gradients

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        if hasattr(trainer.strategy, "gradient_norm"):
            self.model_norms.append(float(trainer.strategy.gradient_norm()))


def _trainer(devices, strategy, *, epochs=1, callbacks=(), precision="32-true"):
    # With a model summary: under PPStrategy global rank 0 then also says each stage's size.
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, callbacks=list(callbacks), precision=precision,
        gradient_clip_val=CLIP,
        **trainer_kwargs(max_epochs=epochs, enable_checkpointing=bool(callbacks[1:]), enable_model_summary=True),
    )


def _train_data():
    return DataLoader(Ids(20), batch_size=4)


def _predict_data():
    return DataLoader(Ids(6, seed=1), batch_size=4)  # a short last batch


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _logged_by_rank_zero():
    """The lines ``rank_zero_info`` logs meanwhile (Lightning's logger for them)."""
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = _Keep()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def _fit(devices, strategy, *, epochs=1, resume=None, callbacks=(), precision="32-true", predict=False) -> dict:
    L.seed_everything(0)
    model = GPT2LM()
    record = Record()
    trainer = _trainer(devices, strategy, epochs=epochs, callbacks=(record, *callbacks), precision=precision)
    with _logged_by_rank_zero() as logged:
        trainer.fit(model, _train_data(), ckpt_path=resume)
    result = {
        "losses": record.losses, "norms": record.norms, "model_norms": record.model_norms, "state": _state(model),
        "logged": logged,
    }
    if predict:
        result["preds"] = trainer.predict(model, _predict_data())
        # Whether the predict batches went through PPStrategy's streaming feed (read ahead of Lightning).
        result["streamed"] = type(trainer.predict_loop._combined_loader.flattened[0]).__name__ == "PredictFeed"
    return result


def _pp(**kwargs):
    from lightning_pp import PPStrategy

    return PPStrategy(pipeline_parallel_size=2, num_microbatches=4, **kwargs)


def _pp2_job(rank: int, world: int, directory: str, one_device_tied: str) -> dict:
    torch.set_num_threads(1)
    checkpoint = ModelCheckpoint(dirpath=directory, filename="epoch1")
    out = {"saved": _fit(world, _pp(), callbacks=[checkpoint], predict=True)}
    out["saved"]["best"] = checkpoint.best_model_path
    out["resumed"] = _fit(
        world, _pp(schedule="Interleaved1F1B"), epochs=2, resume=os.path.join(directory, "epoch1.ckpt"), predict=True
    )
    for schedule in ("GPipe", "ZBH1"):
        out[schedule] = _fit(world, _pp(schedule=schedule))
    out["bf16"] = _fit(world, _pp(), precision="bf16-mixed", predict=True)
    out["tied"] = _fit_tied_sequential(world, _pp(), directory, epochs=1)
    out["tied_resumed"] = _fit_tied_sequential(world, _pp(), directory, epochs=2, resume=one_device_tied)
    return out


def _fit_tied_sequential(devices, strategy, directory, *, epochs, resume=None) -> dict:
    """An nn.Sequential whose head is its embedding (first and last stage); saved after each epoch."""
    L.seed_everything(0)
    model = TiedLM()
    record = Record()
    checkpoint = ModelCheckpoint(dirpath=directory, filename="tied-{epoch}", save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, callbacks=[record, checkpoint],
                        **trainer_kwargs(max_epochs=epochs, enable_checkpointing=True, enable_model_summary=True))
    with _logged_by_rank_zero() as logged:
        trainer.fit(model, make_loader(num_items=16, batch_size=8), ckpt_path=resume)
    return {"losses": record.losses, "state": _state(model), "logged": logged}


def _resume_on_one_rank(rank: int, world: int, path: str) -> dict:
    from lightning_pp import PPStrategy

    return _fit(world, PPStrategy(pipeline_parallel_size=1), epochs=2, resume=path)


def _merged(states) -> dict[str, torch.Tensor]:
    """The ranks' state dicts as one: a name several ranks hold must hold the same value everywhere."""
    merged: dict[str, torch.Tensor] = {}
    for state in states:
        for name, value in state.items():
            if name in merged:
                torch.testing.assert_close(value, merged[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
            merged[name] = value
    return merged


def _assert_states_equal(actual, expected, rtol=1e-4, atol=1e-5):
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One device: two epochs with a plain Lightning checkpoint after the first; one epoch of bf16-mixed."""
    pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("one-device")
    callback = ModelCheckpoint(dirpath=directory, filename="{epoch}", save_top_k=-1)
    whole = _fit(1, "auto", epochs=2, callbacks=[callback], predict=True)
    whole["epoch1"] = torch.load(directory / "epoch=0.ckpt", weights_only=False)
    tied = _fit_tied_sequential(1, "auto", directory, epochs=2)
    tied["epoch1_file"] = str(directory / "tied-epoch=0.ckpt")
    tied["epoch1"] = torch.load(tied["epoch1_file"], weights_only=False)
    return {"fp32": whole, "bf16": _fit(1, "auto", precision="bf16-mixed", predict=True), "tied": tied}


@pytest.fixture(scope="module")
def pipelined(reference, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pp2")
    one_device_tied = reference["tied"]["epoch1_file"]
    return directory, run_on_ranks(_pp2_job, 2, str(directory), one_device_tied, init_process_group=False, timeout=600)


@pytest.mark.slow
def test_fit_with_clipping_checkpoint_resume_and_predict_equal_one_device(reference, pipelined):
    ref = reference["fp32"]
    steps = len(ref["losses"]) // 2
    assert min(ref["norms"]) > CLIP, "every step clips, so a norm over one stage would change the losses"
    _, results = pipelined
    for r in results:
        torch.testing.assert_close(r["saved"]["losses"], ref["losses"][:steps], rtol=RTOL, atol=ATOL)
        # Resumed under another split (4 virtual stages) with the saved weights, momentum and schedule.
        torch.testing.assert_close(r["resumed"]["losses"], ref["losses"][steps:], rtol=RTOL, atol=ATOL)
        # PPStrategy.gradient_norm() on every rank: the one-device norm (the tied head counted once).
        torch.testing.assert_close(r["saved"]["model_norms"], ref["norms"][:steps], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r["resumed"]["model_norms"], ref["norms"][steps:], rtol=1e-4, atol=1e-6)
    # Each rank's own gradients are not the model's: the check above can fail.
    assert all(abs(a - b) > 1e-3 for a, b in zip(results[0]["saved"]["norms"], ref["norms"]))
    _assert_states_equal(_merged([r["saved"]["state"] for r in results]), ref["epoch1"]["state_dict"])
    _assert_states_equal(_merged([r["resumed"]["state"] for r in results]), ref["state"])
    # Predict streams the block list's batches (1F1B layout); Interleaved1F1B predicts batch by batch.
    assert all(r["saved"]["streamed"] and r["bf16"]["streamed"] for r in results)
    # Rank 0 returns what one device returns.
    assert len(results[0]["resumed"]["preds"]) == len(ref["preds"]) == 2
    for mine, theirs in zip(results[0]["resumed"]["preds"], ref["preds"]):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_rank_zero_gives_the_whole_models_size_beside_the_summary_of_its_stage(pipelined):
    from lightning.pytorch.utilities.model_summary import get_human_readable_count

    _, results = pipelined
    # A block list whose head is tied to the embedding, then an nn.Sequential tied the same way: each
    # tied weight counts once, as in the one-device summary, though the first and last stage both hold it.
    for key, make in (("saved", GPT2LM), ("tied", TiedLM)):
        total = get_human_readable_count(sum(p.numel() for p in make().parameters())).strip()
        said = [line for line in results[0][key]["logged"] if line.startswith("PPStrategy:")]
        assert len(said) == 1 and f"the model has {total} parameters; by pipeline stage " in said[0], said
        assert not [line for line in results[1][key]["logged"] if line.startswith("PPStrategy:")]


@pytest.mark.slow
def test_consolidated_checkpoint_is_the_one_device_checkpoint(reference, pipelined):
    from lightning_pp import consolidate_checkpoint
    from lightning_pp.checkpoint.sharded import is_sharded_checkpoint

    directory, results = pipelined
    path = directory / "epoch1.ckpt"
    assert results[0]["saved"]["best"] == str(path) and is_sharded_checkpoint(path)
    plain = reference["fp32"]["epoch1"]
    ckpt = consolidate_checkpoint(path, directory / "consolidated.ckpt")
    # Every tensor, under the unchanged module's names; the tied head equals its embedding.
    _assert_states_equal(ckpt["state_dict"], plain["state_dict"])
    state = ckpt["state_dict"]
    assert torch.equal(state["model.lm_head.weight"], state["model.transformer.wte.weight"])
    # Momentum indexed as one device indexes it, the scheduler's state and learning rate.
    ours, theirs = ckpt["optimizer_states"][0], plain["optimizer_states"][0]
    assert ours["param_groups"][0]["params"] == theirs["param_groups"][0]["params"]
    assert ours["param_groups"][0]["lr"] == pytest.approx(theirs["param_groups"][0]["lr"])
    assert sorted(ours["state"]) == sorted(theirs["state"])
    for index, saved in theirs["state"].items():
        torch.testing.assert_close(ours["state"][index]["momentum_buffer"], saved["momentum_buffer"], rtol=1e-4,
                                   atol=1e-5)
    assert ckpt["lr_schedulers"] == plain["lr_schedulers"] and ckpt["global_step"] == plain["global_step"]
    # The unchanged module loads it (strict) and predicts what the pipeline predicted after epoch one.
    fresh = GPT2LM()
    fresh.load_state_dict(torch.load(directory / "consolidated.ckpt", weights_only=False)["state_dict"])
    fresh.eval()
    with torch.no_grad():
        expected = [fresh.predict_step(batch, i) for i, batch in enumerate(_predict_data())]
    for mine, theirs in zip(results[0]["saved"]["preds"], expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_of_two_stages_resumes_at_another_pipeline_size(reference, pipelined):
    directory, _ = pipelined
    ref = reference["fp32"]
    steps = len(ref["losses"]) // 2
    (result,) = run_on_ranks(_resume_on_one_rank, 1, str(directory / "epoch1.ckpt"), init_process_group=False,
                             timeout=300)
    torch.testing.assert_close(result["losses"], ref["losses"][steps:], rtol=RTOL, atol=ATOL)
    _assert_states_equal(result["state"], ref["state"])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["GPipe", "ZBH1"])
def test_other_schedules_with_clipping_equal_one_device(reference, pipelined, schedule):
    ref = reference["fp32"]
    steps = len(ref["losses"]) // 2
    _, results = pipelined
    for r in results:
        torch.testing.assert_close(r[schedule]["losses"], ref["losses"][:steps], rtol=RTOL, atol=ATOL)
    _assert_states_equal(_merged([r[schedule]["state"] for r in results]), ref["epoch1"]["state_dict"])


@pytest.mark.slow
def test_bf16_mixed_equals_one_device_bf16_mixed(reference, pipelined):
    ref = reference["bf16"]
    _, results = pipelined
    # Autocast ran on the stages: one device's bf16-mixed logits are bfloat16, so are these.
    assert [p.dtype for p in results[0]["bf16"]["preds"]] == [p.dtype for p in ref["preds"]] == [torch.bfloat16] * 2
    # bf16 keeps 8 bits of mantissa: the logits (|x| < 0.5) may differ by a few units in the
    # last place (0.002), since microbatches of a quarter of the rows make autocast's matmuls
    # run other shapes, whose CPU kernels sum in another order.
    for mine, theirs in zip(results[0]["bf16"]["preds"], ref["preds"]):
        torch.testing.assert_close(mine, theirs, rtol=1.6e-2, atol=8e-3)
    # The loss and the weights stay in fp32 and move by far less (measured 5e-5 relative, 7e-5).
    for r in results:
        torch.testing.assert_close(r["bf16"]["losses"], ref["losses"], rtol=1e-3, atol=0)
    _assert_states_equal(_merged([r["bf16"]["state"] for r in results]), ref["state"], rtol=1e-2, atol=1e-3)


@pytest.mark.slow
def test_weight_tied_across_stages_is_one_parameter_of_the_checkpoint(reference, pipelined):
    """A head tied to the embedding has one name on one device: its optimizer state is stored once, under it.

    Consolidating gives the one-device checkpoint, and a one-device checkpoint resumes at pp=2.
    """
    from lightning_pp import consolidate_checkpoint

    directory, results = pipelined
    ref = reference["tied"]
    plain = ref["epoch1"]
    ckpt = consolidate_checkpoint(directory / "tied-epoch=0.ckpt")
    _assert_states_equal(ckpt["state_dict"], plain["state_dict"])
    ours, theirs = ckpt["optimizer_states"][0], plain["optimizer_states"][0]
    assert ours["param_groups"][0]["params"] == theirs["param_groups"][0]["params"]
    assert sorted(ours["state"]) == sorted(theirs["state"])
    for index, saved in theirs["state"].items():
        torch.testing.assert_close(ours["state"][index]["momentum_buffer"], saved["momentum_buffer"], rtol=1e-4,
                                   atol=1e-5)
    # The unchanged module and its optimizer load it as they load the one-device checkpoint.
    fresh = TiedLM()
    fresh.load_state_dict(ckpt["state_dict"])
    fresh.configure_optimizers().load_state_dict(ours)
    # And PPStrategy resumes the one-device checkpoint: the second epoch as on one device.
    steps = len(ref["losses"]) // 2
    for r in results:
        torch.testing.assert_close(r["tied_resumed"]["losses"], ref["losses"][steps:], rtol=RTOL, atol=ATOL)
    _assert_states_equal(_merged([r["tied_resumed"]["state"] for r in results]), ref["state"])


# -- errors, in one process -------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, returns: str = "tensor") -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, DIM)
        self.returns = returns

    def forward(self, x):
        h = x + torch.tanh(self.linear(x))
        if self.returns == "dict with text":
            return {"hidden": h, "note": "a string"}
        if self.returns == "object":
            return types.SimpleNamespace(hidden=h)
        return (h, None)  # a tuple, as Hugging Face blocks return: only its first element goes on


class LoopModel(L.LightningModule):
    """A user's loop over ``self.blocks``; ``order`` says which blocks it calls, ``returns`` what block 1 returns."""

    def __init__(self, num_blocks: int = 4, order=None, returns: str = "tensor") -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(returns if i == 1 else "tensor") for i in range(num_blocks))
        self.head = nn.Linear(DIM, VOCAB)
        self.order = list(range(num_blocks)) if order is None else order

    def forward(self, ids):
        h = self.embed(ids)
        for i in self.order:
            out = self.blocks[i](h)
            h = out[0] if isinstance(out, tuple) else out
        return self.head(h)


def _stage(model, slices, stage):
    from lightning_pp.pipeline.block_stage import BlockPipeline

    return BlockPipeline(model.blocks, "blocks", {stage: slices[stage]})


def _ids():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "returns, what", [("dict with text", r"str at \['note'\]"), ("object", "SimpleNamespace")], ids=["dict", "object"]
)
def test_a_block_output_that_is_not_tensors_names_the_block_before_anything_is_sent(returns, what):
    from lightning_pp.distributed.errors import PayloadError

    model = LoopModel(returns=returns)
    stage = _stage(model, [range(0, 2), range(2, 4)], 0)
    with pytest.raises(PayloadError, match=rf"Block 1 of blocks \(the last block of its pipeline stage\) passed on "
                                           rf"{what}.*must return its hidden states as a tensor"):
        stage.run_stage(0, None, lambda: model(_ids()), stop=True)
    # A tuple whose first element is the hidden states is what Hugging Face blocks return: it goes on.
    ok = LoopModel()
    sent = _stage(ok, [range(0, 2), range(2, 4)], 0).run_stage(0, None, lambda: ok(_ids()), stop=True)
    assert isinstance(sent, torch.Tensor) and sent.shape == (2, SEQ, DIM)


@pytest.mark.parametrize(
    "order, slices, stage, match",
    [
        ([1, 0, 2, 3], [range(0, 2), range(2, 4)], 0, "The step called block 1 of blocks before block 0"),
        ([0, 1, 3, 2], [range(0, 2), range(2, 4)], 1, "The step called block 3 of blocks before block 2"),
        ([0, 1, 2, 2, 3], [range(0, 4)], 0, "The step called block 2 of blocks again"),
        ([0, 1, 2, 3, 0], [range(0, 4)], 0, "The step called block 0 of blocks again"),
    ],
    ids=["out-of-order-first-stage", "out-of-order-last-stage", "twice", "first-block-again-at-the-end"],
)
def test_blocks_called_out_of_order_or_twice_fail_with_block_call_error(order, slices, stage, match):
    from lightning_pp.pipeline.block_stage import BlockCallError

    model = LoopModel(order=order)
    pipeline = _stage(model, slices, stage)
    received = None if stage == 0 else torch.zeros(2, SEQ, DIM, requires_grad=True)
    last = stage == len(slices) - 1
    with pytest.raises(BlockCallError, match=match):
        pipeline.run_stage(stage, received, lambda: model(_ids()), stop=not last)


class TwoStacks(L.LightningModule):
    """An encoder and a decoder of equal size: which one to pipeline is the user's call."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(Block() for _ in range(3))
        self.decoder = nn.ModuleList(Block() for _ in range(3))


@pytest.mark.parametrize(
    "make, devices, match",
    [
        (lambda: LoopModel(num_blocks=3), 4,
         r"LoopModel.blocks has 3 blocks, fewer than the 4 pipeline stages.*at most 3"),
        (TwoStacks, 2,
         r"several equally large lists of blocks: encoder \(3 x Block\), decoder \(3 x Block\).*"
         r"PPStrategy\(sequential='encoder'\)"),
    ],
    ids=["fewer-blocks-than-stages", "ambiguous"],
)
def test_block_list_errors_are_raised_in_the_launching_process(make, devices, match):
    from lightning_pp import PPStrategy

    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=PPStrategy(), **trainer_kwargs())
    # What PipelineLauncher runs before it starts any other rank (tests/integration/test_bad_input.py
    # shows the launched job ending with this error and exit code 1).
    with pytest.raises(ValueError, match=match):
        trainer.strategy._check_before_launch(trainer, (make(),))
