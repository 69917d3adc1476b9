"""Peak host memory per rank: a >= 1 GB Llama-style model read per stage vs built whole on every rank.

A random Llama-style model (fp32, about 1.07 GB) is saved as a sharded Hugging Face
checkpoint directory in a temporary folder. Then three jobs of 4 CPU processes
(``PPStrategy(pipeline_parallel_size=4)``, torchrun-style environment) each run one
``trainer.predict`` batch:

* ``per-stage``: ``trainer.init_module(empty_init=True)`` (meta device) and
  ``load_hf_checkpoint``: each rank allocates and reads only its stage;
* ``whole``: every rank builds the whole model and reads the whole checkpoint (as
  before per-stage materialisation), then the same predict;
* ``tiny``: the per-stage recipe with a tiny model of the same family: the fixed
  overhead of a pipelined predict (Lightning, process groups, transformers, buffers).

Each rank reports its peak RSS growth: ``VmHWM`` at the end minus ``VmRSS`` just
before the model is built (the high-water mark is reset there through
``/proc/self/clear_refs``). The goal (issue 13): per-stage growth <= 0.35 x model
size + the fixed overhead. Linux only. Takes about 3-6 minutes on 2 cores and needs
about 6 GB of RAM for the ``whole`` job and 1.1 GB of disk.

    python benchmarks/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

WORLD = 4
BIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=18,
           num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256)
TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rank(mode: str, directory: str) -> None:
    import lightning as L
    import torch
    import transformers
    from torch.utils.data import DataLoader

    from lightning_pp import PPStrategy
    from lightning_pp.checkpoint import load_hf_checkpoint

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()

    class LM(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def predict_step(self, batch, batch_idx):
            return self.model(input_ids=batch).logits[:, -1].argmax(-1)

    trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy=PPStrategy(pipeline_parallel_size=WORLD),
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    config = transformers.AutoConfig.from_pretrained(directory)
    if mode == "whole":  # what every rank did before per-stage materialisation: build it all, then read it all
        model = LM(transformers.LlamaForCausalLM(config))
    else:
        with trainer.init_module(empty_init=True):
            model = LM(transformers.LlamaForCausalLM(config))
    load_hf_checkpoint(model.model, directory)
    ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    trainer.predict(model, DataLoader([ids], batch_size=None))
    stage_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print("RESULT " + json.dumps({
        "rank": trainer.global_rank, "growth": _status("VmHWM") - before, "stage_bytes": stage_bytes,
        "seconds": time.perf_counter() - start,
    }), flush=True)


def _job(mode: str, directory: str) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank", mode, directory], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{mode} rank failed (exit {proc.returncode}):\n{err[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return sorted(results, key=lambda r: r["rank"])


def _save(config: dict, directory: str) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    model.save_pretrained(directory, max_shard_size="200MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    gb = 1e9
    with tempfile.TemporaryDirectory() as tmp:
        big, tiny = os.path.join(tmp, "big"), os.path.join(tmp, "tiny")
        size = _save(BIG, big)
        _save(TINY, tiny)
        shards = len([f for f in os.listdir(big) if f.endswith(".safetensors")])
        print(f"model: {size / gb:.2f} GB fp32 in {shards} shards; pp={WORLD} on CPU, one predict batch")
        runs = {mode: _job(mode, tiny if mode == "tiny" else big) for mode in ("tiny", "per-stage", "whole")}
    overhead = max(r["growth"] for r in runs["tiny"])
    print(f"fixed overhead (tiny model, largest rank): {overhead / gb:.3f} GB")
    print("rank | per-stage growth (GB) | stage weights (GB) | growth/model | (growth-overhead)/model "
          "| whole-model growth (GB) | per-stage/whole")
    for mine, whole in zip(runs["per-stage"], runs["whole"]):
        print(f"{mine['rank']:>4} | {mine['growth'] / gb:>21.3f} | {mine['stage_bytes'] / gb:>18.3f} | "
              f"{mine['growth'] / size:>12.3f} | {(mine['growth'] - overhead) / size:>23.3f} | "
              f"{whole['growth'] / gb:>23.3f} | {mine['growth'] / whole['growth']:>15.3f}")
    worst = max((r["growth"] - overhead) / size for r in runs["per-stage"])
    verdict = "meets" if worst <= 0.35 else "misses"
    print(f"goal: growth <= 0.35 x model + overhead: worst rank {worst:.3f} x model ({verdict} the goal)")
    print("seconds per rank (per-stage / whole): "
          + ", ".join(f"{a['seconds']:.0f}/{b['seconds']:.0f}" for a, b in zip(runs["per-stage"], runs["whole"])))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        _rank(*args.rank)
    else:
        main()
