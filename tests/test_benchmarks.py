"""The benchmark scripts run end to end at toy sizes and write the JSON their README tables come from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *arguments: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *arguments,
                                "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "| " in completed.stdout  # a Markdown table was printed
    return json.loads(out.read_text())


def test_throughput_smoke(tmp_path):
    data = run_script("throughput", "--sizes", "32", "64", "--repeats", "1", "--skip-sd", tmp_path=tmp_path)
    assert {"matmul", "convolution", "measured", "theoretical"} <= set(data["peaks"]["float32"])
    rows = data["results"]
    assert [(row["dtype"], row["size"]) for row in rows] == [
        ("float32", 32), ("float32", 64), ("bfloat16", 32), ("bfloat16", 64)]
    assert all(row["seconds"] > 0 for row in rows)
    # Convolutions cost FLOPs in proportion to the pixels; the mid-block attention adds a little more.
    ratio = rows[1]["gflops"] / rows[0]["gflops"]
    assert 4.0 <= ratio < 4.5


def test_engine_smoke(tmp_path):
    data = run_script("engine", "--size", "48", "--quality-size", "32", "--cycles", "2", "--tile-size", "64",
                      "--tile", "32", tmp_path=tmp_path)
    assert [row["chain"] for row in data["overhead"]] == ["ladder", "mixed session"]
    assert data["naive"]["naive_seconds"] > 0
    assert {row["dtype"] for row in data["bfloat16"]} == {"float32", "bfloat16"}
    assert data["batching"]["images"] == 4
    assert [row["case"] for row in data["tiling"]] == ["whole", "tiles of 32"]
    app = data["app"]
    assert app["slowest_phase"] in app["phases"]
    assert abs(sum(app["phases"].values()) - app["seconds"]) < 1e-6


def test_training_step_smoke(tmp_path):
    data = run_script("training_step", "--cycles", "1", "2", "--repeats", "1", "--crop", "32", tmp_path=tmp_path)
    rows = data["results"]
    assert [(row["cycles"], row["gradient_checkpointing"]) for row in rows] == [
        (1, False), (1, True), (2, False), (2, True)]
    assert all(row["seconds_per_step"] > 0 for row in rows)
