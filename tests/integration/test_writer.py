"""``StreamingPredictionWriter``: rows on disk as batches complete, exactly once across a kill and restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_pp.integration.writer import (
    StreamingPredictionWriter,
    read_predictions,
    rows_of,
    written_indices,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "stream_predict.py"


class _Trainer:
    global_rank = 0


def test_rows_of_splits_tensors_dicts_and_per_row_lists():
    prediction = {"p": torch.tensor([[0.5, 0.5], [1.0, 0.0]]), "label": ["a", "b"], "k": torch.tensor([3, 4])}
    assert rows_of(prediction, 2) == [{"p": [0.5, 0.5], "label": "a", "k": 3}, {"p": [1.0, 0.0], "label": "b", "k": 4}]


def test_pending_maps_positions_to_dataset_indices_and_skips_written_rows(tmp_path):
    writer = StreamingPredictionWriter(tmp_path)
    subset = writer.pending(list(range(10)))
    assert len(subset) == 10
    writer.write_on_batch_end(_Trainer(), None, torch.arange(4) * 10, [0, 1, 2, 3], None, 0, 0)
    writer.on_predict_end(None, None)
    # A kill tears the last line of the file: it does not count as written.
    with open(tmp_path / "part-00000.jsonl", "a") as f:
        f.write('{"index": 4, "predic')
    assert written_indices(tmp_path) == {0, 1, 2, 3}

    again = StreamingPredictionWriter(tmp_path)
    subset = again.pending(list(range(10)))
    assert list(subset) == [4, 5, 6, 7, 8, 9]
    # Positions are into the subset; the file gets dataset indices. Row 9 twice (a
    # sampler's padding) is written once.
    again.write_on_batch_end(_Trainer(), None, torch.tensor([40, 50, 90, 90]), [0, 1, 5, 5], None, 0, 0)
    again.on_predict_end(None, None)
    lines = (tmp_path / "part-00000.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 2, 3, 4, 5, 9]
    assert [r["prediction"] for r in read_predictions(tmp_path)] == [0, 10, 20, 30, 40, 50, 90]


def test_writer_needs_batch_indices(tmp_path):
    with pytest.raises(RuntimeError, match="DataLoader"):
        StreamingPredictionWriter(tmp_path).write_on_batch_end(_Trainer(), None, torch.zeros(2), [], None, 0, 0)


def _one_device_rows(num_rows: int) -> list[dict]:
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import stream_predict
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    model = stream_predict.make_model()
    (tokens,) = stream_predict.make_dataset(num_rows).tensors
    with torch.inference_mode():
        probs = model.layers(tokens)[:, -1].softmax(-1)
    top = probs.max(-1)
    return [{"token": int(t), "prob": float(p)} for t, p in zip(top.indices, top.values)]


@pytest.mark.slow
def test_killed_job_restarts_and_writes_every_row_exactly_once(tmp_path):
    """Kills the 2-stage example with SIGKILL after a few batches, then runs it again."""
    rows, out = 96, tmp_path / "preds"
    command = [sys.executable, str(EXAMPLE), "--rows", str(rows), "--batch-size", "8", "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    job = subprocess.Popen(
        command + ["--slow", "0.4"], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while len(written_indices(out)) < 24:
            assert job.poll() is None, f"the job ended before it was killed:\n{job.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "the job wrote nothing in 90 s"
            time.sleep(0.1)
    finally:
        # Both ranks (the launcher re-ran the script in the same session) die at once.
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        job.stderr.close()
    done = written_indices(out)
    assert 24 <= len(done) < rows, "kill the job half-way"
    with open(out / "part-00000.jsonl", "a") as f:  # as if killed in the middle of a write
        f.write('{"index": 95, "predicti')

    restart = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert f"predicted {rows - len(done)} rows this run" in restart.stdout

    lines = [line for path in sorted(out.glob("part-*.jsonl")) for line in path.read_text().splitlines()]
    indices = [json.loads(line)["index"] for line in lines]
    assert sorted(indices) == list(range(rows)), "every row exactly once"
    expected = _one_device_rows(rows)
    for record in read_predictions(out):
        want = expected[record["index"]]
        assert record["prediction"]["token"] == want["token"]
        assert record["prediction"]["prob"] == pytest.approx(want["prob"], rel=1e-5)
