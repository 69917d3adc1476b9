"""The README's main job runs end to end, through Lightning's own launcher (it re-runs the script per rank)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_and_writes_predictions(tmp_path):
    out = tmp_path / "predictions.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--epochs", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[demo] trained 1 epochs on 2 pipeline stages" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(len(rows))) and len(rows) > 10
    assert all(set(r) == {"row", "predicted", "expected"} for r in rows)
