"""Generation throughput on CPU: pp=1 and 2, against transformers, per position; chunk-latency spread.

    python benchmarks/bench_generate.py throughput --devices 1
    python benchmarks/bench_generate.py throughput --devices 2
    python benchmarks/bench_generate.py vs-transformers
    python benchmarks/bench_generate.py chunks
    python benchmarks/bench_generate.py continuous [--prompts 64 --running 16]

``vs-transformers``: one process, one intra-op thread, the same random 8-layer
Llama-style model (width ``--width``, 8 heads over 4 key/value heads, vocabulary
512) saved once and loaded by both; 32 prompts of 16 to 256 tokens, 64 new tokens
each, greedy, no EOS. This project's ``GenerationModule`` through
``trainer.predict`` at pp=1 (all 32 prompts in one batch, one slot) against
transformers' ``model.generate`` (batched, left-padded, its KV cache); generated
tokens per second of each call's wall time (prefill included; the first call of
each is a warm-up). Then this project's time per decode step at positions 128, 512
and 1024 (8 sequences per step, after a prefill of that many tokens), which stays
flat when a token costs O(1) to cache and the attention over the prefix is small
next to the matmuls.

``throughput``: 16 prompts of 16-48 tokens, 32 new tokens each, a random
8-layer decoder (width 256), one intra-op thread per process; generated tokens
per second of ``trainer.predict`` wall time on rank 0.
``chunks``: one 1536-token prompt prefilled in chunks on one process; each
chunk's measured latency (median of ``--repeats`` prefills), fixed 256-token
chunks vs predictor-sized chunks (first chunk 256), reported as max/min and
coefficient of variation. The predictor profiles chunks of 64-512 tokens after
cached prefixes of 0, 512 and 1024 tokens and fits ``a·n·(p + n) + b·n + c``.
``continuous``: ``--prompts`` prompts of 16-64 tokens whose ``max_new_tokens``
spread evenly over 8..256 (shuffled, no EOS), the 8-layer width-256 decoder, one
thread per process; the same ``--running`` sequences in flight both ways:
DataLoader batches of ``--running`` prompts, each running until its longest
continuation ends, against one window of all prompts with
``GenerationModule(max_running=--running)``, where a finished sequence's place
goes to the next prompt at once. Generated tokens per second of each (the first
of two calls, on two prompts, is a warm-up), the forwards each launched, both
ratios, whether the outputs are identical, and the load average (the machine may
be shared). On a CPU a forward's cost grows with its rows almost as fast as the
rows (the weights stay in cache), so tokens per second gain less than the
forwards fall; where a decode forward costs about the same whatever its rows
(bound by reading the weights, as on a GPU) tokens per second would follow the
forwards' ratio instead (not measured here: no GPU).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_pp import PPStrategy
from lightning_pp.generation.chunking import ChunkPlanner
from lightning_pp.generation.engine import StageContext, init_chunk_planner
from lightning_pp.generation.kv_cache import KVCache, StepRows
from lightning_pp.integration.generation_module import (
    GenerationModule,
    PromptDataset,
    collate_prompts,
)
from lightning_pp.models.llama import DecoderConfig, DecoderLM


def _model(layers: int = 8, width: int = 256) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(DecoderConfig(vocab_size=512, hidden_size=width, intermediate_size=2 * width, num_layers=layers,
                                   num_heads=8, num_kv_heads=4))


def throughput(devices: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (16 + (7 * i) % 33,), generator=g).tolist() for i in range(16)]
    new = 32
    model = GenerationModule(_model(), max_new_tokens=new, eos_token_ids=(), num_microbatches=2)
    loader = DataLoader(PromptDataset(prompts), batch_size=16, collate_fn=collate_prompts)
    timer = _BatchTimer()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=PPStrategy() if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[timer])
    start = time.perf_counter()
    out = trainer.predict(model, loader)
    elapsed = time.perf_counter() - start
    if trainer.global_rank == 0:
        tokens = sum(len(s) for b in out for s in b)
        # Generation itself (the batches), and the whole call with process launch and setup.
        print(f"pp={devices}: {tokens} tokens in {timer.seconds:.2f} s of generation = {tokens / timer.seconds:.1f} "
              f"tokens/s ({elapsed:.2f} s including launch and setup)")


class _BatchTimer(L.Callback):
    """Seconds spent inside predict batches (excludes launching ranks and setting up the pipeline)."""

    def __init__(self) -> None:
        self.seconds, self._start = 0.0, 0.0

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.seconds += time.perf_counter() - self._start


def _save_hf_llama(path: str, width: int, layers: int = 8):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, eos_token_id=None,
        bos_token_id=None, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def _hf_generate(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only batched generation needs
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[:, longest:].tolist()


def _ours_generate(path: str, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
    model = GenerationModule(DecoderLM.from_pretrained(path), max_new_tokens=new, eos_token_ids=())
    loader = DataLoader(PromptDataset(prompts), batch_size=len(prompts), collate_fn=collate_prompts)
    timer = _BatchTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    out = trainer.predict(model, loader)
    return [seq for batch in out for seq in batch], timer.seconds


def _decode_step_seconds(path: str, position: int, num_seqs: int = 8, steps: int = 32) -> float:
    """Median seconds of one decode step of ``num_seqs`` sequences just past ``position`` cached tokens."""
    from lightning_pp.generation.engine import PipelineGenerator

    module = GenerationModule(DecoderLM.from_pretrained(path), max_new_tokens=steps + 1, eos_token_ids=())
    generator = PipelineGenerator(module._parts(StageContext()), StageContext(), max_new_tokens=steps + 1,
                                  planner=ChunkPlanner(256))
    g = torch.Generator().manual_seed(position)
    prompts = [torch.randint(0, 512, (position,), generator=g) for _ in range(num_seqs)]
    times: list[float] = []
    launch = generator._launch

    def timed(step: int):  # at pp=1 a launch runs the whole forward (embed, layers, head, pick)
        start = time.perf_counter()
        result = launch(step)
        times.append(time.perf_counter() - start)
        return result

    generator._launch = timed  # type: ignore[method-assign]
    generator.generate(prompts)
    prefill_forwards = -(-position // 256)
    return statistics.median(times[prefill_forwards:prefill_forwards + steps])


def vs_transformers(width: int) -> None:
    import tempfile

    torch.set_num_threads(1)
    new, g = 64, torch.Generator().manual_seed(0)
    lengths = [16 + (240 * i) // 31 for i in range(32)]  # 16 .. 256
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]
    with tempfile.TemporaryDirectory() as path:
        hf = _save_hf_llama(path, width)
        _hf_generate(hf, prompts[:2], 4)  # warm-up
        start = time.perf_counter()
        theirs = _hf_generate(hf, prompts, new)
        hf_s = time.perf_counter() - start
        _ours_generate(path, prompts[:2], 4)  # warm-up
        ours, ours_s = _ours_generate(path, prompts, new)
        tokens = len(prompts) * new
        same = sum(a == b for a, b in zip(ours, theirs))
        print(f"width {width}, 8 layers, 32 prompts of {min(lengths)}-{max(lengths)} tokens, {new} new tokens each, "
              f"1 thread")
        print(f"lightning_pp pp=1: {tokens / ours_s:8.1f} tokens/s ({ours_s:.2f} s)")
        print(f"transformers     : {tokens / hf_s:8.1f} tokens/s ({hf_s:.2f} s)")
        print(f"identical continuations: {same}/{len(prompts)}")
        for position in (128, 512, 1024):
            step = _decode_step_seconds(path, position)
            print(f"decode step at position {position:5d}: {step * 1e3:7.2f} ms for 8 sequences "
                  f"= {step / 8 * 1e3:6.2f} ms per generated token")


def _timed_predict(model: GenerationModule, data: PromptDataset, batch_size: int, devices: int):
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate_prompts)
    timer = _BatchTimer()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=PPStrategy() if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[timer])
    out = trainer.predict(model, loader)
    return (None if trainer.global_rank else [seq for b in out for seq in b]), timer.seconds, model.num_forwards


def continuous(num_prompts: int, running: int, devices: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (16 + (48 * i) // max(num_prompts - 1, 1),), generator=g).tolist()
               for i in range(num_prompts)]
    limits = [8 + (248 * i) // max(num_prompts - 1, 1) for i in range(num_prompts)]  # 8 .. 256
    random.Random(0).shuffle(limits)
    data = PromptDataset(prompts, max_new_tokens=limits)
    load = os.getloadavg()
    results = {}
    for name, batch_size, cap in (("whole batches", running, None), ("continuous", num_prompts, running)):
        model = GenerationModule(_model(), max_new_tokens=256, eos_token_ids=(), max_running=cap)
        _timed_predict(model, PromptDataset(prompts[:2], max_new_tokens=[4, 4]), 2, devices)  # warm-up
        model.num_forwards = 0
        results[name] = _timed_predict(model, data, batch_size, devices)
    if results["continuous"][0] is None:
        return  # not rank 0
    tokens = sum(limits)
    (plain, plain_s, plain_n), (ours, ours_s, ours_n) = results["whole batches"], results["continuous"]
    print(f"{num_prompts} prompts of 16-64 tokens, max_new_tokens 8-256 (mean {tokens / num_prompts:.0f}), "
          f"{running} sequences in flight, pp={devices}, 1 thread per process; load average before "
          f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    for name, seconds, forwards in ((f"whole batches of {running}", plain_s, plain_n),
                                    (f"max_running={running}", ours_s, ours_n)):
        print(f"{name:>20}: {tokens / seconds:8.1f} tokens/s ({seconds:.2f} s), {forwards} forwards, "
              f"{tokens / forwards:.1f} tokens per forward")
    print(f"ratio continuous / whole batches: {plain_s / ours_s:.2f} in tokens/s, {plain_n / ours_n:.2f} in forwards; "
          f"identical outputs: {sum(a == b for a, b in zip(plain, ours))}/{num_prompts}")


def _chunk_latencies(lm: DecoderLM, prompt: torch.Tensor, planner: ChunkPlanner) -> list[tuple[int, float]]:
    caches = [KVCache() for _ in lm.layers]
    done, out = 0, []
    with torch.no_grad():
        while done < prompt.numel():
            n = planner.next_chunk(done, prompt.numel() - done)
            start = time.perf_counter()
            hidden, residual = lm.embed(prompt[done:done + n])
            rows = StepRows((0,), (n,), (done,))
            for layer, cache in zip(lm.layers, caches):
                hidden, residual = layer(hidden, residual, rows=rows, cache=cache)
            out.append((n, time.perf_counter() - start))
            done += n
    return out


def chunks(repeats: int) -> None:
    torch.set_num_threads(1)
    lm = _model(layers=4, width=256)
    prompt = torch.randint(0, 512, (1536,), generator=torch.Generator().manual_seed(1))
    parts_module = GenerationModule(lm, max_new_tokens=1)
    parts = parts_module._parts(StageContext())
    planner, why = init_chunk_planner(
        parts, StageContext(), first_chunk=256, profile_sizes=list(range(64, 513, 64)), profile_prefixes=[0, 512, 1024]
    )
    print("predictor:", planner.model if why is None else f"fell back ({why})")
    for name, p in (("fixed 256", ChunkPlanner(256)), ("predictor", planner)):
        runs = [_chunk_latencies(lm, prompt, p) for _ in range(repeats)]
        lat = [(n, statistics.median(run[i][1] for run in runs)) for i, (n, _) in enumerate(runs[0])]
        total = sum(t for _, t in lat)
        lat = lat[:-1]  # the spread leaves out the last chunk: it is whatever remains
        times = [t for _, t in lat]
        print(f"{name}: chunks {[n for n, _ in lat]} latency ms {[round(t * 1e3, 1) for t in times]} "
              f"max/min {max(times) / min(times):.2f} cv {statistics.pstdev(times) / statistics.mean(times):.2f} "
              f"whole prefill {total * 1e3:.0f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["throughput", "vs-transformers", "chunks", "continuous"])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="prefills per chunk plan (chunks)")
    parser.add_argument("--width", type=int, default=256, help="hidden size (vs-transformers)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts (continuous)")
    parser.add_argument("--running", type=int, default=16, help="sequences in flight (continuous)")
    args = parser.parse_args()
    if args.what == "throughput":
        throughput(args.devices)
    elif args.what == "continuous":
        continuous(args.prompts, args.running, args.devices)
    elif args.what == "vs-transformers":
        vs_transformers(args.width)
    else:
        chunks(args.repeats)
