"""Progress of a generation job on rank 0: prompts done, tokens generated, tokens per second.

::

    trainer = L.Trainer(..., callbacks=[GenerationProgress(), StreamingPredictionWriter("out/run")])

After every ``every_n_batches`` batches, global rank 0 prints
``prompts 96/1000 | tokens 12288 | tokens/s 212.4``: through Lightning's progress bar
(TQDM or Rich, above the bar, which it leaves intact) when one is shown, else as a
plain line, so a job without a bar (``enable_progress_bar=False``, a log file) still
reports. The counts are those of
the :class:`~lightning_pp.integration.generation_module.GenerationModule` on global
rank 0, which holds the outputs of its pipeline (all its attention-DP ranks
included); with several data-parallel replicas they cover rank 0's replica, whose
share of the dataset the total names. Tokens per second are generated tokens over
the wall time since the first batch started (prefill included).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from lightning.pytorch.callbacks import Callback

__all__ = ["GenerationProgress"]


class GenerationProgress(Callback):
    """Shows prompts done, tokens generated and tokens per second on global rank 0 while ``predict`` runs.

    Args:
        every_n_batches: report after every ``n``-th batch (and after the last).
        printer: where a line goes when no progress bar is shown (default ``print``).

    Attributes:
        history: every report so far, as ``{"prompts", "tokens", "tokens_per_s", "seconds"}``.
    """

    def __init__(self, every_n_batches: int = 1, printer: Optional[Callable[[str], Any]] = None) -> None:
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be at least 1, got {every_n_batches}.")
        self.every_n_batches = every_n_batches
        self.printer = printer or (lambda line: print(line, flush=True))
        self.history: list[dict[str, float]] = []
        self._start: Optional[float] = None
        self._base = (0, 0)
        self._total: Optional[int] = None

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self.history = []
        self._start = None
        self._base = (getattr(pl_module, "num_prompts_done", 0), getattr(pl_module, "num_tokens_generated", 0))
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        sampler = getattr(loader, "sampler", None)
        try:
            self._total = len(sampler) if sampler is not None else len(loader.dataset)
        except TypeError:  # an iterable dataset: no total
            self._total = None

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_predict_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if not trainer.is_global_zero:
            return
        last = batch_idx + 1 == _num_batches(trainer)
        if (batch_idx + 1) % self.every_n_batches and not last:
            return
        seconds = time.perf_counter() - (self._start or time.perf_counter())
        prompts = getattr(pl_module, "num_prompts_done", 0) - self._base[0]
        tokens = getattr(pl_module, "num_tokens_generated", 0) - self._base[1]
        rate = tokens / seconds if seconds > 0 else 0.0
        self.history.append({"prompts": prompts, "tokens": tokens, "tokens_per_s": rate, "seconds": seconds})
        total = f"/{self._total}" if self._total is not None else ""
        stats = {"prompts": f"{prompts}{total}", "tokens": tokens, "tokens/s": f"{rate:.1f}"}
        line = " | ".join(f"{k} {v}" for k, v in stats.items())
        bar = getattr(trainer, "progress_bar_callback", None)
        if bar is not None and getattr(bar, "is_enabled", False):
            bar.print(line)  # above the bar, without breaking it
        else:
            self.printer(line)


def _num_batches(trainer: Any) -> int:
    counts = getattr(trainer, "num_predict_batches", None) or [0]
    return int(counts[0]) if counts[0] != float("inf") else -1
