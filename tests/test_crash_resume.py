"""Training killed with SIGKILL at random moments, several times in a row, then resumed to the end.

A tiny run that writes a checkpoint after every step is killed at a random point of its step and
checkpoint cycle, so some kills land inside a checkpoint write. After every kill the checkpoint that
``latest`` names must load completely, and the next start must resume from it. The last start runs
to the end: the final model loads, and the log contains each step exactly once.
``test_training_scale.py`` checks separately that one resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from reed import train as train_module
from reed.config import TrainConfig
from reed.models import load_vae

REPO_ROOT = Path(__file__).resolve().parents[1]
# Seed of the kill schedule. The moment a kill lands still varies with the machine's speed.
KILL_SEED = 20250
# Each kill waits for this many new checkpoints (drawn from the range), then for a random part of a step.
CHECKPOINTS_BETWEEN_KILLS = (1, 5)
MAX_EXTRA_DELAY_S = 0.08
PROCESS_TIMEOUT_S = 600




def _write_config(folder: Path, image_folder: str, steps: int) -> Path:
    values = {
        "output_dir": str(folder / "run"), "steps": steps,
        "model": {"block_out_channels": [8, 16], "norm_num_groups": 8, "latent_channels": 4},
        "loss": {"cycles": 2},
        "data": image_folder, "eval_data": image_folder, "crop_size": 16, "batch_size": 2,
        "learning_rate": 1e-3, "warmup_steps": 2, "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 2,
        "eval_every": steps, "eval_cycles": 1, "eval_size": 16, "seed": 0, "threads": 1, "log_with": "none",
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def _start(config_path: Path, log_path: Path) -> subprocess.Popen:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "reed", "train", str(config_path)], cwd=REPO_ROOT,
                                env=environment, stdout=log, stderr=subprocess.STDOUT)


def _checkpoint_step(checkpoints: Path) -> int:
    """Return the step of the latest checkpoint, or 0. The name is read, not state.json, because a running
    process may delete the folder of an older checkpoint at any moment."""
    latest = train_module.latest_checkpoint(checkpoints)
    return 0 if latest is None else int(latest.name.removeprefix("step-"))


def _kill_after_checkpoint(process: subprocess.Popen, checkpoints: Path, target_step: int, delay_s: float,
                           log_path: Path) -> None:
    """SIGKILL ``process`` ``delay_s`` seconds after its checkpoint of ``target_step`` (or a later one)."""
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    try:
        while _checkpoint_step(checkpoints) < target_step:
            if process.poll() is not None:
                pytest.fail(f"training exited with code {process.returncode} before step {target_step}:\n"
                            f"{log_path.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"training wrote no checkpoint of step {target_step} within {PROCESS_TIMEOUT_S} s")
            time.sleep(0.005)
        time.sleep(delay_s)
        assert process.poll() is None, f"training finished before the kill after step {target_step}"
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)


def _check_loadable(checkpoint: Path, config: TrainConfig) -> None:
    """Load every file of the checkpoint, and its weights into a VAE of the configured shape."""
    state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    assert state["step"] == int(checkpoint.name.removeprefix("step-"))
    for path in sorted(checkpoint.glob("*.safetensors")):
        assert load_file(path), f"{path} holds no tensors"
    vae = train_module.build_vae(config)
    vae.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=True)


def _kill_and_resume(tmp_path: Path, image_folder: str, kills: int, steps: int) -> None:
    """Kill ``kills`` starts of a ``steps``-step run, then let one more start finish it.

    ``steps`` must exceed the last kill's step: at most ``kills`` times the largest gap between kills.
    """
    config_path = _write_config(tmp_path, image_folder, steps)
    config = TrainConfig.from_yaml(config_path)
    checkpoints = Path(config.output_dir) / "checkpoints"
    schedule = random.Random(KILL_SEED)
    previous: Path | None = None

    for kill in range(kills):
        log_path = tmp_path / f"start-{kill}.log"
        target = _checkpoint_step(checkpoints) + schedule.randint(*CHECKPOINTS_BETWEEN_KILLS)
        delay_s = schedule.uniform(0.0, MAX_EXTRA_DELAY_S)
        _kill_after_checkpoint(_start(config_path, log_path), checkpoints, target, delay_s, log_path)

        latest = train_module.latest_checkpoint(checkpoints)
        label = f"kill {kill + 1} (after step {target} + {delay_s:.3f} s)"
        assert latest is not None, label
        assert _checkpoint_step(checkpoints) >= target, label
        _check_loadable(latest, config)
        if previous is not None:
            assert f"resumed from {previous.name}" in log_path.read_text(errors="replace"), label
        previous = latest

    final_log = tmp_path / "final.log"
    final = _start(config_path, final_log)
    try:
        code = final.wait(timeout=PROCESS_TIMEOUT_S)
    finally:
        if final.poll() is None:
            final.kill()
            final.wait()
    output = final_log.read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert f"resumed from {previous.name}" in output

    run = Path(config.output_dir)
    vae = load_vae(str(run / "model"), cached=False)
    assert vae.config.latent_channels == 4
    records = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [record["step"] for record in records if "train/loss" in record] == list(range(1, steps + 1))


def test_sigkill_twice_then_resume(tmp_path, image_folder):
    _kill_and_resume(tmp_path, image_folder, kills=2, steps=20)


@pytest.mark.slow
def test_sigkill_six_times_then_resume(tmp_path, image_folder):
    _kill_and_resume(tmp_path, image_folder, kills=6, steps=60)


def test_torn_log_line_then_resume(tmp_path, image_folder):
    """A kill in the middle of appending to log.jsonl leaves a partial last line, which a resume drops."""
    config = TrainConfig.from_yaml(_write_config(tmp_path, image_folder, steps=6))
    log_path = Path(config.output_dir) / "log.jsonl"
    threads = torch.get_num_threads()
    try:
        train_module.train(config, max_steps=3)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write('{"step": 4, "train/lo')
        train_module.train(config)
    finally:
        torch.set_num_threads(threads)  # the config's threads setting applies to this whole process

    records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines()]
    assert [record["step"] for record in records if "train/loss" in record] == list(range(1, 7))
