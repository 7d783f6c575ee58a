"""The training tool at scale: every loss term's gradients, edits between cycles, mixed precision, EMA,
the discriminator, several processes, streamed datasets, logging, model cards and the full-size SD config.

Everything runs on tiny models on a CPU, except the Stable Diffusion config test, which builds the real
83.7M-parameter architecture with random weights and trains it for two steps at 64x64.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from reed import augment, tracking
from reed import train as train_module
from reed.cli import build_parser
from reed.config import LossConfig, TrainConfig
from reed.data import make_crops
from reed.discriminator import NLayerDiscriminator, adaptive_weight, discriminator_loss
from reed.ema import NamedEMA
from reed.evaluation import load_eval_images
from reed.hub_data import DatasetLoadError, StreamingCrops, open_hub_stream
from reed.losses import FrozenEncoder, ReedLoss
from reed.model_card import HubPushError
from reed.precision import Float32GroupNorm, upcast_sensitive_layers
from tests.conftest import make_tiny_vae

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"block_out_channels": [8, 16], "norm_num_groups": 8, "latent_channels": 4}
SD_VAE_PARAMETERS = 83_653_863  # AutoencoderKL with stabilityai/sd-vae-ft-mse's config.json




def tiny_config(output_dir, image_folder, **overrides) -> TrainConfig:
    values = dict(output_dir=str(output_dir), steps=6, model=TINY_MODEL, data=image_folder, eval_data=image_folder,
                  crop_size=16, batch_size=2, learning_rate=1e-3, warmup_steps=2, log_every=1,
                  checkpoint_every=3, eval_every=3, eval_cycles=2, eval_size=16, seed=0, log_with="none",
                  loss={"cycles": 3, "warmup_cycles": 2, "warmup_probability": 0.5})
    values.update(overrides)
    return TrainConfig.from_dict(values)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def losses_by_step(run: Path) -> dict[int, float]:
    return {record["step"]: record["train/loss"] for record in read_log(run) if "train/loss" in record}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.pop("WANDB_API_KEY", None)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, base: str = "configs/tiny-cpu.yaml", **changes) -> Path:
    values = yaml.safe_load((REPO / base).read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    path.write_text(yaml.safe_dump(values))
    return path


# -- every loss term reaches the parameters it trains, and only those -----------------------------------

class StandInLpips(torch.nn.Module):
    """A differentiable stand-in for LPIPS (its real weights need a download): distance of conv features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.features = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (self.features(a) - self.features(b)).pow(2).mean(dim=(1, 2, 3))


def term_gradients(weights: dict, train_encoder: bool = False, perturb_encoder: bool = False,
                   with_discriminator: bool = False) -> tuple[dict[str, torch.Tensor | None], dict, NLayerDiscriminator]:
    """Backpropagate a 2-cycle loss with ``weights`` (others near 0); return the VAE's gradients, logs and D."""
    vae = make_tiny_vae()
    vae.requires_grad_(True)
    anchor = FrozenEncoder.from_vae(vae)
    if perturb_encoder:  # the trained encoder has moved away from the frozen original
        with torch.no_grad():
            for parameter in vae.encoder.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)))
    if not train_encoder:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    config = LossConfig(**{"l1": 1e-12, "l2": 0.0, "kl": 0.0, "cycles": 2, **weights})
    lpips = StandInLpips() if config.lpips > 0 else None
    loss_fn = ReedLoss(config, lpips_model=lpips, anchor_encoder=anchor if config.encoder_anchor > 0 else None)
    torch.manual_seed(4)
    discriminator = NLayerDiscriminator(layers=2, channels=8).requires_grad_(False)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss, logs = loss_fn(vae, images, 2, generator=torch.Generator().manual_seed(1),
                         discriminator=discriminator if with_discriminator else None)
    loss.backward()
    return {name: p.grad for name, p in vae.named_parameters()}, logs, discriminator


def grad_size(grads: dict, prefixes: tuple[str, ...]) -> float:
    return sum(g.abs().sum().item() for name, g in grads.items() if name.startswith(prefixes) and g is not None)


DECODER = ("decoder.", "post_quant_conv.")
ENCODER = ("encoder.", "quant_conv.")


@pytest.mark.parametrize("term, weight, train_encoder, trains", [
    ("l1", 1.0, False, DECODER),
    ("l2", 1.0, False, DECODER),
    ("lpips", 1.0, False, DECODER),
    ("latent", 1.0, False, DECODER),
    ("consistency", 1.0, False, DECODER),
    ("kl", 1.0, True, ENCODER),
])
def test_loss_term_reaches_its_parameters(term, weight, train_encoder, trains):
    without, _, _ = term_gradients({}, train_encoder=train_encoder)
    with_term, logs, _ = term_gradients({term: weight}, train_encoder=train_encoder)
    assert logs[term] > 0
    assert grad_size(with_term, trains) > 1e3 * grad_size(without, trains)


def test_reconstruction_terms_leave_frozen_encoder_alone():
    grads, _, _ = term_gradients({"l1": 1.0, "l2": 1.0, "latent": 1.0})
    assert all(grads[name] is None for name in grads if name.startswith(ENCODER))


def test_encoder_anchor_trains_encoder_only():
    without, without_logs, _ = term_gradients({}, train_encoder=True, perturb_encoder=True)
    with_anchor, logs, _ = term_gradients({"encoder_anchor": 1.0}, train_encoder=True, perturb_encoder=True)
    assert without_logs["encoder_anchor"] == 0.0
    assert logs["encoder_anchor"] > 0
    assert grad_size(with_anchor, ENCODER) > 1e3 * grad_size(without, ENCODER)
    for name in with_anchor:
        if name.startswith(DECODER):
            torch.testing.assert_close(with_anchor[name], without[name])


def test_encoder_anchor_is_zero_before_training():
    vae = make_tiny_vae()
    anchor = FrozenEncoder.from_vae(vae)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(anchor(images), vae.encode(images).latent_dist.mode())
    assert all(not p.requires_grad for p in anchor.parameters())


def test_adversarial_term_trains_decoder_not_discriminator():
    without, _, _ = term_gradients({}, with_discriminator=True)
    with_term, logs, discriminator = term_gradients({"adversarial": 1.0}, with_discriminator=True)
    assert logs["adversarial"] != 0.0
    assert grad_size(with_term, DECODER) > 1e3 * grad_size(without, DECODER)
    assert all(p.grad is None for p in discriminator.parameters())


def test_adaptive_adversarial_weight_is_logged():
    _, logs, _ = term_gradients({"l1": 1.0, "adversarial": 0.5, "adversarial_adaptive": True}, with_discriminator=True)
    assert logs["adversarial_weight"] > 0.0
    assert logs["adversarial_weight"] != 1.0


def test_adaptive_weight_balances_gradients():
    layer = torch.nn.Linear(4, 1)
    inputs = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    small = layer(inputs).mean()
    large = 10 * layer(inputs).mean()
    torch.testing.assert_close(adaptive_weight(small, large, layer.weight), torch.tensor(0.1), rtol=1e-3, atol=1e-4)


def test_discriminator_loss_trains_discriminator():
    torch.manual_seed(0)
    discriminator = NLayerDiscriminator(layers=2, channels=8)
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    fake = torch.zeros(2, 3, 32, 32, requires_grad=True)
    loss, logs = discriminator_loss(discriminator, real, fake.detach())
    loss.backward()
    assert set(logs) == {"loss", "logits_real", "logits_fake"}
    # The last bias's gradient is -1/2 + 1/2 = 0 while both hinges are active, so check the weights.
    weights = [p for name, p in discriminator.named_parameters() if name.endswith("weight")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)
    assert fake.grad is None


def test_discriminator_scores_patches():
    discriminator = NLayerDiscriminator(layers=3, channels=16)
    logits = discriminator(torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, 1, 6, 6)


# -- ordinary edits between cycles --------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(augment.EDITS))
def test_edit_passes_gradient_and_matches_target(name):
    images = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    edited, target = augment.EDITS[name](images, images.detach().clone(), torch.Generator().manual_seed(1))
    assert edited.shape == images.shape
    torch.testing.assert_close(edited.detach(), target)
    edited.sum().backward()
    assert images.grad is not None
    assert images.grad.abs().sum() > 0


def test_jpeg_edit_is_straight_through():
    images = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    edited, _ = augment.jpeg_edit(images, images.detach(), torch.Generator().manual_seed(1))
    assert not torch.allclose(edited.detach(), images.detach())
    edited.sum().backward()
    torch.testing.assert_close(images.grad, torch.ones_like(images))


def test_edits_between_cycles_reach_decoder():
    vae = make_tiny_vae()
    vae.encoder.requires_grad_(False)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss_fn = ReedLoss(LossConfig(cycles=3, edit_probability=1.0))
    loss, logs = loss_fn(vae, images, 3, num_warmup=1, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert logs["edits"] == 3.0  # one after the warm-up cycle, one between each pair of the 3 cycles
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_edit_probability_zero_keeps_random_stream():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain, _ = ReedLoss(LossConfig(cycles=2))(make_tiny_vae(), images, 2, generator=torch.Generator().manual_seed(1))
    zero, logs = ReedLoss(LossConfig(cycles=2, edit_probability=0.0, edits=["jpeg"]))(
        make_tiny_vae(), images, 2, generator=torch.Generator().manual_seed(1))
    assert logs["edits"] == 0.0
    assert zero.item() == plain.item()


# -- mixed precision and gradient checkpointing ---------------------------------------------------------

def test_upcast_keeps_group_norm_in_float32_under_bf16():
    vae = make_tiny_vae()
    names_before = list(vae.state_dict())
    changed = upcast_sensitive_layers(vae)
    assert changed > 0
    assert list(vae.state_dict()) == names_before
    norm = next(m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm))
    assert type(norm) is Float32GroupNorm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = torch.nn.functional.conv2d(torch.randn(1, 8, 8, 8), torch.randn(8, 8, 3, 3))
        assert features.dtype == torch.bfloat16
        assert norm(features).dtype == torch.float32
        decoded = vae.decode(vae.encode(torch.rand(1, 3, 16, 16)).latent_dist.mode()).sample
    assert decoded.dtype == torch.float32


def test_gradient_checkpointing_gives_same_gradients(tmp_path, image_folder, monkeypatch):
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)

    def decoder_grads(checkpointing: bool) -> torch.Tensor:
        config = tiny_config(tmp_path, image_folder, gradient_checkpointing=checkpointing)
        vae = train_module.build_vae(config)
        images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        loss, _ = ReedLoss(config.loss)(vae, images, 2, generator=torch.Generator().manual_seed(1))
        loss.backward()
        return vae.decoder.conv_out.weight.grad

    plain = decoder_grads(False)
    assert calls == []
    checkpointed = decoder_grads(True)
    assert len(calls) > 0
    torch.testing.assert_close(checkpointed, plain)


def test_bf16_run_completes(tmp_path):
    config = write_config(tmp_path / "bf16.yaml", output_dir=str(tmp_path / "run"), steps=2, checkpoint_every=2,
                          eval_every=2, mixed_precision="bf16")
    result = subprocess.run([sys.executable, "-m", "reed", "train", str(config)], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed precision bf16" in result.stdout
    assert (tmp_path / "run" / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert all(np.isfinite(value) for value in losses_by_step(tmp_path / "run").values())


# -- EMA and the discriminator in checkpoints -----------------------------------------------------------

def test_named_ema_averages_and_reloads():
    vae = make_tiny_vae()
    vae.encoder.requires_grad_(False)
    ema = NamedEMA(vae, decay=0.5)
    assert all(not name.startswith("encoder.") for name in ema.tensors())
    name = "decoder.conv_out.weight"
    start = vae.decoder.conv_out.weight.detach().clone()
    ema.step()  # diffusers' warm-up: the first step copies the weights (decay 0)
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(1.0)
    ema.step()  # decay (1 + 1) / (10 + 1) = 2/11, so the average moves 9/11 of the way
    torch.testing.assert_close(ema.tensors()[name], start + 9 / 11)

    other = make_tiny_vae(seed=1)
    other.encoder.requires_grad_(False)
    restored = NamedEMA(other, decay=0.5)
    restored.load(ema.tensors(), ema.counters())
    torch.testing.assert_close(restored.tensors()[name], ema.tensors()[name])
    assert restored.optimization_step == ema.optimization_step == 2
    restored.copy_to(other)
    torch.testing.assert_close(other.decoder.conv_out.weight.detach(), ema.tensors()[name])


def test_named_ema_rejects_missing_names():
    ema = NamedEMA(make_tiny_vae(), decay=0.9)
    with pytest.raises(ValueError, match="lacks"):
        ema.load({}, ema.counters())


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory, image_folder):
    """One uninterrupted run and one stopped at step 3 and resumed, with EMA, a discriminator and edits."""
    root = tmp_path_factory.mktemp("resume")
    options = dict(steps=6, ema_decay=0.9, final_weights="ema", discriminator={"layers": 2, "channels": 8},
                   loss={"cycles": 2, "adversarial": 0.1, "adversarial_start_step": 2, "adversarial_adaptive": True,
                         "edit_probability": 0.5})
    whole = tiny_config(root / "whole", image_folder, **options)
    train_module.train(whole)
    parts = tiny_config(root / "parts", image_folder, **options)
    stopped = train_module.train(parts, max_steps=3)
    train_module.train(parts)
    return root / "whole", root / "parts", stopped


def test_resume_with_ema_and_discriminator_matches(resumed_runs):
    whole, parts, _ = resumed_runs
    assert losses_by_step(parts) == pytest.approx(losses_by_step(whole), rel=1e-5)
    disc_whole = {r["step"]: r["disc/loss"] for r in read_log(whole) if "disc/loss" in r}
    disc_parts = {r["step"]: r["disc/loss"] for r in read_log(parts) if "disc/loss" in r}
    assert sorted(disc_whole) == [3, 4, 5, 6]  # the discriminator starts after adversarial_start_step=2
    assert disc_parts == pytest.approx(disc_whole, rel=1e-5)
    whole_weights = load_file(whole / "model" / "diffusion_pytorch_model.safetensors")
    parts_weights = load_file(parts / "model" / "diffusion_pytorch_model.safetensors")
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(parts_weights[name], tensor, rtol=1e-5, atol=1e-6)


def test_checkpoint_holds_ema_and_discriminator(resumed_runs):
    _, _, stopped = resumed_runs
    ema = load_file(stopped / "ema.safetensors")
    model = load_file(stopped / "model.safetensors")
    disc = load_file(stopped / "discriminator.safetensors")
    meta = json.loads((stopped / "state.json").read_text())
    assert "decoder.conv_out.weight" in ema
    assert not torch.equal(ema["decoder.conv_out.weight"], model["decoder.conv_out.weight"])
    assert any(key.startswith("model.net.") for key in disc)
    assert any(key.startswith("state.") for key in disc)
    assert meta["ema"]["optimization_step"] == 3
    assert meta["num_processes"] == 1


def test_final_weights_are_the_ema(resumed_runs):
    whole, _, _ = resumed_runs
    last = train_module.latest_checkpoint(whole / "checkpoints")
    ema = load_file(last / "ema.safetensors")
    final = load_file(whole / "model" / "diffusion_pytorch_model.safetensors")
    for name, tensor in ema.items():
        torch.testing.assert_close(final[name], tensor)


# -- logging, evaluation output and the model card ------------------------------------------------------

def test_run_logs_memory_speed_and_ladder(resumed_runs, image_folder):
    whole, _, _ = resumed_runs
    records = read_log(whole)
    train_records = [r for r in records if "train/loss" in r]
    assert all(r["memory/rss_gib"] > 0 for r in train_records)
    assert all(r["images_per_second"] > 0 for r in train_records)
    assert all("train/adversarial" in r and "train/edits" in r for r in train_records)
    evals = [r for r in records if "eval/psnr_src_step1" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0 < r["eval/ssim_src_step1"] <= 1 for r in evals)
    grids = sorted(p.name for p in (whole / "eval").glob("*.png"))
    assert grids == ["ladder-step-00000003.png", "ladder-step-00000006.png"]
    grid = np.asarray(Image.open(whole / "eval" / grids[-1]))
    assert grid.shape == (3 * 16, 3 * 16, 3)  # three held-out images, columns source | step 1 | step 2


def test_model_card_names_base_data_weights_and_figures(resumed_runs, image_folder):
    whole, _, _ = resumed_runs
    card = (whole / "model" / "README.md").read_text()
    last_eval = [r for r in read_log(whole) if "eval/psnr_src_step1" in r][-1]
    assert "library_name: diffusers" in card
    assert "none (trained from scratch)" in card
    assert image_folder in card
    assert "| adversarial | 0.1 |" in card
    assert "EMA of the trained weights" in card
    assert "| steps | 6 of 6 |" in card
    assert "| crop augmentation | none |" in card
    assert f"{last_eval['eval/psnr_src_step1']:.4f} dB" in card


def test_redirected_log_lines_stay_ordered(tmp_path):
    # stdout and stderr go to one file, as with `python -m reed train ... > log 2>&1`.
    script = ("from tqdm.auto import tqdm\n"
              "from reed.train import _write_line\n"
              "bar = tqdm(range(5), mininterval=0)\n"
              "for step in bar:\n"
              "    _write_line(bar, f'line {step}')\n")
    log = tmp_path / "log.txt"
    # Without PYTHONUNBUFFERED, stdout into a file is block-buffered, as on most machines.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    with open(log, "wb") as handle:
        subprocess.run([sys.executable, "-c", script], stdout=handle, stderr=handle, env=env, check=True,
                       timeout=60)
    text = log.read_text(encoding="utf-8")

    # Each line is printed before the bar reaches the end, not flushed all together when the process exits.
    assert text.index("line 0") < text.index("5/5")
    for row in text.split("\n"):
        if "line" in row:
            assert row.split("\r")[-1].startswith("line")  # the bar was cleared before the line


def test_progress_line_is_compact():
    record = {"step": 20, "lr": 1e-4, "images_per_second": 12.5, "train/loss": 0.5, "train/cycles": 3.0,
              "disc/loss": 1.0, "memory/rss_gib": 1.5}
    line = tracking.progress_line(record, 100)
    assert line == "step 20/100 | loss 0.5 disc_loss 1 | lr 0.0001 | 12.5 img/s | rss_gib 1.50"


def test_trackers_resolve():
    assert tracking.resolve_trackers("none") == []
    assert set(tracking.resolve_trackers("auto")) <= {"tensorboard", "wandb"}
    with pytest.raises(ValueError, match="log_with must be"):
        tracking.resolve_trackers("mlflow")


@pytest.mark.skipif(tracking._importable("tensorboard"), reason="tensorboard is installed here")
def test_missing_tracker_named_explicitly_rejected():
    with pytest.raises(ValueError, match="pip install tensorboard"):
        tracking.resolve_trackers("tensorboard")


def test_ladder_image_goes_to_image_trackers():
    class FakeTracker:
        def __init__(self, name):
            self.name, self.calls = name, []

        def log_images(self, values, step, **kwargs):
            self.calls.append((values, step, kwargs))

    board, wandb, other = FakeTracker("tensorboard"), FakeTracker("wandb"), FakeTracker("comet_ml")
    image = np.zeros((8, 24, 3), dtype=np.uint8)
    assert tracking.log_images([board, wandb, other], "eval/ladder", image, 7) == ["tensorboard", "wandb"]
    assert board.calls[0][0]["eval/ladder"].shape == (1, 8, 24, 3)
    assert board.calls[0][2] == {"dataformats": "NHWC"}
    assert wandb.calls[0][0]["eval/ladder"][0] is image
    assert other.calls == []


def test_hparams_are_flat():
    flat = tracking.flat_hparams({"loss": {"l1": 1.0, "edits": ["crop"]}, "base": None, "steps": 3})
    assert flat == {"loss.l1": 1.0, "loss.edits": "['crop']", "base": "None", "steps": 3}


def test_push_to_hub_offline_fails_before_training(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tiny_config(tmp_path / "run", image_folder, push_to_hub="someone/reed-vae")
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set"):
        train_module.train(config)
    assert not (tmp_path / "run" / "log.jsonl").exists()


# -- data: held-out folder and streamed datasets --------------------------------------------------------

def test_eval_data_folder_is_used(tmp_path, image_folder):
    config = tiny_config(tmp_path, image_folder, eval_data=image_folder, eval_size=16)
    images = load_eval_images(config)
    assert images.shape == (3, 3, 16, 16)


def fake_examples(count: int) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"image": Image.fromarray(rng.integers(0, 256, (40 + i, 56, 3), dtype=np.uint8)), "label": i}
            for i in range(count)]


def test_streaming_crops_resume_exactly():
    examples = fake_examples(5)
    opened = []

    def open_stream(skip):
        opened.append(skip)
        return iter(examples[skip:])

    crops = StreamingCrops(open_stream, "image", crop_size=16, seed=0)
    first = crops.batch(3)
    assert all(c.shape == (16, 16, 3) and c.dtype == np.uint8 for c in first)
    saved = json.loads(json.dumps(crops.state_dict()))
    expected = crops.batch(4)  # runs past the end of the stream: the next epoch starts from the top
    assert opened == [0, 0]

    resumed = StreamingCrops(open_stream, "image", crop_size=16, seed=0)
    resumed.load_state_dict(saved)
    for got, want in zip(resumed.batch(4), expected):
        np.testing.assert_array_equal(got, want)
    assert opened[-2:] == [3, 0]


def test_streaming_crops_missing_column_rejected():
    crops = StreamingCrops(lambda skip: iter(fake_examples(2)), "img", crop_size=16, seed=0)
    with pytest.raises(ValueError, match="no column 'img'"):
        crops.batch(1)


def test_hub_dataset_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetLoadError, match="pip install datasets"):
        open_hub_stream("someone/photos", "train", 0, 0, 1, 0)


def test_hub_dataset_source_builds_streaming_crops(tmp_path, image_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    config = tiny_config(tmp_path, image_folder, data="hf:someone/photos")
    crops = make_crops(config, process_index=1, num_processes=2)
    assert isinstance(crops, StreamingCrops)
    with pytest.raises(DatasetLoadError, match="needs the datasets package"):
        crops.batch(1)


# -- configuration -------------------------------------------------------------------------------------

def test_train_encoder_defaults_to_decoder_only_for_a_base(tmp_path, image_folder):
    assert tiny_config(tmp_path, image_folder).train_encoder is True
    assert tiny_config(tmp_path, image_folder, base="some/vae").train_encoder is False
    assert tiny_config(tmp_path, image_folder, base="some/vae", train_encoder=True).train_encoder is True


@pytest.mark.parametrize("changes, message", [
    ({"loss": {"encoder_anchor": 1.0}}, "needs a base model"),
    ({"base": "some/vae", "loss": {"encoder_anchor": 1.0}}, "needs train_encoder: true"),
    ({"loss": {"edits": ["sepia"]}}, "loss.edits: unknown names"),
    ({"loss": {"edits": []}}, "loss.edits must be a non-empty list"),
    ({"loss": {"edits": "jpeg"}}, "must be a list of names"),
    ({"loss": {"edit_probability": 1.5}}, "edit_probability"),
    ({"loss": {"adversarial": -1.0}}, "loss.adversarial must be >= 0"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ({"ema_decay": 1.0}, "ema_decay must be in"),
    ({"final_weights": "ema"}, "needs ema_decay"),
    ({"random_init": True}, "Set base"),
    ({"data": "hf:"}, "names no dataset"),
    ({"push_to_hub": "no-owner"}, "OWNER/NAME"),
    ({"discriminator": {"layers": 0}}, "layers must be a positive integer"),
])
def test_invalid_training_options_rejected(tmp_path, image_folder, changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, image_folder, **changes)


def test_cli_random_init_flag():
    args = build_parser().parse_args(["train", "configs/sd-vae-reed.yaml", "--random-init"])
    assert args.random_init is True


# -- the full-size Stable Diffusion config --------------------------------------------------------------

@pytest.mark.slow  # builds and trains the 83.7M-parameter VAE and writes 1.3 GB: about 2.5 minutes on 2 cores
def test_sd_config_trains_two_steps_at_64px(tmp_path):
    config = TrainConfig.from_yaml(REPO / "configs" / "sd-vae-reed.yaml", {
        "random_init": True, "output_dir": str(tmp_path / "run"), "data": "bundled", "crop_size": 64,
        "batch_size": 1, "steps": 2, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2, "eval_every": 2,
        "eval_size": 64, "eval_cycles": 1, "mixed_precision": "no", "log_with": "none", "threads": 2,
    })
    config.loss.lpips = 0.0  # LPIPS weights need a download
    assert config.base == "stabilityai/sd-vae-ft-mse"
    assert config.train_encoder is False
    vae = train_module.build_vae(config)
    assert sum(p.numel() for p in vae.parameters()) == SD_VAE_PARAMETERS
    del vae

    final = train_module.train(config)
    assert sorted(losses_by_step(tmp_path / "run")) == [1, 2]
    assert all(np.isfinite(value) for value in losses_by_step(tmp_path / "run").values())
    assert (final / "diffusion_pytorch_model.safetensors").is_file()
    assert "stabilityai/sd-vae-ft-mse" in (final / "README.md").read_text()


def test_sd_config_describes_the_sd_vae():
    config = TrainConfig.from_yaml(REPO / "configs" / "sd-vae-reed.yaml")
    assert config.model.block_out_channels == (128, 256, 512, 512)
    assert config.model.layers_per_block == 2
    assert config.model.latent_channels == 4
    assert config.model.norm_num_groups == 32
    assert config.crop_size == 512
    assert config.train_encoder is False


# -- several processes and hard kills, through subprocesses ---------------------------------------------

def accelerate_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "reed", "train", str(config), *extra]


TWO_PROCESS_OPTIONS = dict(steps=4, ema_decay=0.9, discriminator={"layers": 2, "channels": 8},
                           loss={"adversarial": 0.1, "adversarial_start_step": 1, "edit_probability": 0.5})


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """A 4-step run of two processes on the CPU, with EMA, the discriminator and edits between cycles."""
    root = tmp_path_factory.mktemp("two-processes")
    config = write_config(root / "whole.yaml", output_dir=str(root / "whole"), **TWO_PROCESS_OPTIONS)
    result = subprocess.run(accelerate_command(config), cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_two_processes_train_like_one(two_process_run):
    root, result = two_process_run
    run = root / "whole"
    assert "2 process(es) (MULTI_CPU)" in result.stdout
    assert result.stdout.count("reed train: saved") == 1  # only the main process writes
    meta = json.loads((run / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert meta["num_processes"] == 2
    assert meta["processes"][0]["crops"] != meta["processes"][1]["crops"]
    assert sorted(losses_by_step(run)) == [1, 2, 3, 4]
    assert [r["step"] for r in read_log(run) if "disc/loss" in r] == [2, 3, 4]
    assert (run / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run / "model" / "README.md").is_file()


@pytest.mark.slow  # two more launches of two processes: about a minute on two CPU cores
def test_two_processes_resume_matches(two_process_run):
    root, _ = two_process_run
    config = write_config(root / "parts.yaml", output_dir=str(root / "parts"), **TWO_PROCESS_OPTIONS)
    for extra in (["--max-steps", "2"], []):
        result = subprocess.run(accelerate_command(config, *extra), cwd=REPO, env=subprocess_env(),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step-00000002" in result.stdout
    assert losses_by_step(root / "parts") == pytest.approx(losses_by_step(root / "whole"), rel=1e-5)


def test_accelerate_cpu_launch_runs_two_processes(tmp_path):
    """The literal `accelerate launch --cpu --num_processes 2` command: accelerate starts one process,
    and reed train starts the two (reed.launch)."""
    config = write_config(tmp_path / "cpu.yaml", output_dir=str(tmp_path / "run"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), "-m", "reed", "train", str(config)]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting 2 on this machine" in result.stdout
    assert "2 process(es) (MULTI_CPU)" in result.stdout
    assert result.stdout.count("reed train: saved") == 1
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert meta["num_processes"] == 2
    assert (tmp_path / "run" / "model" / "diffusion_pytorch_model.safetensors").is_file()


def test_accelerate_cpu_launch_failure_stops_both(tmp_path):
    config = write_config(tmp_path / "bad.yaml", output_dir=str(tmp_path / "run"), crop_size=20)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), "-m", "reed", "train", str(config)]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "returned non-zero exit status 2." in result.stderr  # the first failing process's code
    assert "must be multiples of 8" in result.stderr


@pytest.mark.parametrize("environ, arguments, expected", [
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"},
     ["python", "/bin/accelerate", "launch", "--cpu", "--num_processes", "3", "-m", "reed"], 3),
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"},
     ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes=2"], 2),
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "2"},
     ["python", "/bin/accelerate", "launch", "--cpu", "--num_processes", "2"], 0),  # already has a rank
    ({"ACCELERATE_USE_CPU": "True"}, ["python", "/bin/accelerate", "launch", "--cpu"], 0),  # one process asked
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"},
     ["python", "/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "--num_machines", "2"], 0),
    ({}, ["python", "/bin/accelerate", "launch", "--num_processes", "2"], 0),  # not a CPU launch
])
def test_requested_cpu_processes(environ, arguments, expected):
    from reed.launch import requested_cpu_processes

    count, note = requested_cpu_processes(environ, arguments)
    assert count == expected
    assert (note is not None) == ("--num_machines" in arguments)


def test_killed_run_resumes_like_uninterrupted(tmp_path):
    options = dict(steps=40, checkpoint_every=5, eval_every=40, log_every=1)
    killed_config = write_config(tmp_path / "killed.yaml", output_dir=str(tmp_path / "killed"), **options)
    command = [sys.executable, "-m", "reed", "train", str(killed_config)]
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 600
    while train_module.latest_checkpoint(checkpoints) is None and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    if process.poll() is None and train_module.latest_checkpoint(checkpoints) is None:
        process.kill()
        pytest.fail("the run wrote no checkpoint within 600 s")
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    killed_at = train_module.latest_checkpoint(checkpoints)
    assert not (tmp_path / "killed" / "model").exists()

    resumed = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed_at.name}" in resumed.stdout

    whole_config = TrainConfig.from_yaml(write_config(tmp_path / "whole.yaml", output_dir=str(tmp_path / "whole"),
                                                      **options))
    train_module.train(whole_config)
    logged_steps = [record["step"] for record in read_log(tmp_path / "killed") if "train/loss" in record]
    assert logged_steps == list(range(1, 41))  # steps logged after the checkpoint were dropped on resume
    assert losses_by_step(tmp_path / "killed") == pytest.approx(losses_by_step(tmp_path / "whole"), rel=1e-5)
