"""The REED loss, the training loop, checkpoints and resume, on tiny models and images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reed import losses, train as train_module
from reed.config import LossConfig, TrainConfig
from reed.losses import ReedLoss, quantize_8bit
from reed.models import load_vae
from tests.conftest import make_tiny_vae

TINY_MODEL = {"block_out_channels": [8, 16], "norm_num_groups": 8, "latent_channels": 4}




def tiny_config(tmp_path, image_folder, **overrides) -> TrainConfig:
    values = dict(output_dir=str(tmp_path / "run"), steps=6, model=TINY_MODEL, data=image_folder,
                  crop_size=16, batch_size=2, learning_rate=1e-3, warmup_steps=2, log_every=1,
                  checkpoint_every=3, eval_every=3, eval_cycles=2, eval_size=16, seed=0,
                  loss={"cycles": 3, "warmup_cycles": 2, "warmup_probability": 0.5})
    values.update(overrides)
    return TrainConfig.from_dict(values)


def gradients(vae, loss_config: LossConfig, cycles: int, decoder_only: bool = True) -> dict[str, torch.Tensor | None]:
    vae.zero_grad(set_to_none=True)
    vae.requires_grad_(True)
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss, _ = ReedLoss(loss_config)(vae, images, cycles, generator=torch.Generator().manual_seed(1))
    loss.backward()
    return {name: p.grad for name, p in vae.named_parameters()}


def test_quantize_rounds_and_passes_gradient():
    values = torch.tensor([-1.5, -0.5001, 0.0, 0.9999, 2.0], requires_grad=True)
    rounded = quantize_8bit(values)
    levels = (rounded.detach() + 1) * 127.5
    torch.testing.assert_close(levels, levels.round())
    assert rounded.detach().min() == -1.0
    assert rounded.detach().max() == 1.0
    rounded.sum().backward()
    torch.testing.assert_close(values.grad, torch.ones(5))


@pytest.mark.parametrize("term", ["l1", "l2"])
def test_reconstruction_terms_reach_decoder_only(term):
    weights = {"l1": 0.0, "l2": 0.0, "kl": 0.0, term: 1.0}
    grads = gradients(make_tiny_vae(), LossConfig(**weights), cycles=2)
    decoder = [g for name, g in grads.items() if name.startswith(("decoder.", "post_quant_conv."))]
    encoder = [g for name, g in grads.items() if name.startswith(("encoder.", "quant_conv."))]
    assert all(g is not None and g.abs().sum() > 0 for g in decoder)
    assert all(g is None for g in encoder)


def test_kl_term_reaches_encoder():
    config = LossConfig(l1=1e-12, l2=0.0, kl=1.0)
    grads = gradients(make_tiny_vae(), config, cycles=1, decoder_only=False)
    assert grads["encoder.conv_in.weight"].abs().sum() > 0
    assert grads["quant_conv.weight"].abs().sum() > 0


def test_latent_term_reaches_decoder():
    without = gradients(make_tiny_vae(), LossConfig(l1=1e-12, l2=0.0, kl=0.0), cycles=2)
    with_latent = gradients(make_tiny_vae(), LossConfig(l1=1e-12, l2=0.0, kl=0.0, latent=1.0), cycles=2)
    name = "decoder.conv_out.weight"
    assert with_latent[name].abs().sum() > 1e3 * without[name].abs().sum()
    assert with_latent["encoder.conv_in.weight"] is None


def test_consistency_compares_with_first_decode(monkeypatch):
    vae = make_tiny_vae()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss_fn = ReedLoss(LossConfig(consistency=1.0, cycles=2))
    # A single cycle from the clean image is x1 itself: nothing to compare.
    assert loss_fn(vae, images, 1)[1]["consistency"] == 0.0

    # With warm-up, x1 is the first warm-up decode. Record what each term compares with.
    compared = []
    real_l1 = losses.F.l1_loss
    monkeypatch.setattr(losses.F, "l1_loss", lambda a, b: compared.append(b) or real_l1(a, b))
    with torch.no_grad():
        first = quantize_8bit(vae.decode(vae.encode(images).latent_dist.mode()).sample)
    _, logs = loss_fn(vae, images, 2, num_warmup=3, generator=torch.Generator().manual_seed(1))
    assert logs["consistency"] > 0
    # Two cycles, each compared with the target (l1 term) and with x1 (consistency term).
    assert len(compared) == 4
    torch.testing.assert_close(compared[1], first)
    torch.testing.assert_close(compared[3], first)


def test_consistency_rejects_edits_between_cycles():
    with pytest.raises(ValueError, match="loss.edit_probability: 0"):
        LossConfig(consistency=1.0, cycles=2, edit_probability=0.5)


def test_consistency_rejects_single_cycle_batches():
    with pytest.raises(ValueError, match="every batch runs one cycle"):
        LossConfig(consistency=1.0)
    assert LossConfig(consistency=1.0, warmup_cycles=3).consistency == 1.0  # warm-up supplies x1


@pytest.mark.parametrize("section", ["loss", "model", "discriminator"])
def test_config_section_typo_lists_valid_keys(tmp_path, image_folder, section):
    with pytest.raises(ValueError, match=f"Unknown {section} keys \\['consistancy'\\]. Valid {section} keys"):
        tiny_config(tmp_path, image_folder, **{section: {"consistancy": 1.0}})


def test_contraction_term_reaches_decoder():
    without = gradients(make_tiny_vae(), LossConfig(l1=1e-12, l2=0.0, kl=0.0), cycles=1)
    config = LossConfig(l1=1e-12, l2=0.0, kl=0.0, contraction=1.0, contraction_target=0.0)
    with_contraction = gradients(make_tiny_vae(), config, cycles=1)
    name = "decoder.conv_out.weight"
    assert with_contraction[name].abs().sum() > 1e3 * without[name].abs().sum()
    assert with_contraction["encoder.conv_in.weight"] is None


def test_contraction_gain_finds_worst_direction():
    # Power iteration must find a direction amplified more than random ones are.
    vae = make_tiny_vae().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    anchor = vae.encode(images).latent_dist.mode()
    start = torch.randn(anchor.shape, generator=generator)
    random_gain = losses.contraction_gain(vae, anchor, start, iterations=0, step=0.05)
    worst_gain = losses.contraction_gain(vae, anchor, start, iterations=8, step=0.05)
    assert random_gain.shape == (2,)
    assert (worst_gain > random_gain).all()


def test_contraction_is_logged_and_skipped_at_zero():
    images = torch.zeros(1, 3, 16, 16)
    _, logs = ReedLoss(LossConfig(contraction=0.5))(make_tiny_vae(), images, 1, num_warmup=2)
    assert logs["contraction_gain"] > 0
    _, logs = ReedLoss(LossConfig())(make_tiny_vae(), images, 1)
    assert logs["contraction_gain"] == 0.0
    assert logs["contraction"] == 0.0


def test_gradient_flows_through_frozen_encoder(monkeypatch):
    """A second cycle's error must reach the first cycle's decoding through the frozen encoder."""
    config = LossConfig(l1=1.0, l2=1.0, kl=0.0)
    chained = gradients(make_tiny_vae(), config, cycles=2)
    monkeypatch.setattr(losses, "quantize_8bit", lambda images: quantize_8bit(images).detach())
    cut = gradients(make_tiny_vae(), config, cycles=2)
    name = "decoder.conv_out.weight"
    assert not torch.allclose(chained[name], cut[name])


def test_loss_logs_every_term():
    images = torch.zeros(1, 3, 16, 16)
    loss, logs = ReedLoss(LossConfig(cycles=3))(make_tiny_vae(), images, 3, num_warmup=2)
    assert set(logs) >= {"loss", "l1", "l2", "lpips", "kl", "latent", "l2_last_cycle", "cycles", "warmup"}
    assert logs["cycles"] == 3.0
    assert logs["warmup"] == 2.0
    assert logs["loss"] == pytest.approx(loss.item())


def test_lpips_weight_without_model_rejected():
    with pytest.raises(ValueError, match="loss.lpips > 0 needs an LPIPS model"):
        ReedLoss(LossConfig(lpips=0.5), lpips_model=None)


@pytest.mark.parametrize("changes, message", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"crop_size": 20}, "multiples of 8"),
    ({"loss": {"cycles": 0}}, "cycles must be a positive integer"),
    ({"loss": {"contraction": -1.0}}, "contraction must be >= 0"),
    ({"loss": {"contraction_step": 0.0}}, "contraction_step must be > 0"),
    ({"loss": {"cycle_schedule": "random"}}, "cycle_schedule must be one of"),
    ({"loss": {"l1": 0, "l2": 0}}, "At least one reconstruction weight"),
    ({"model": {"block_out_channels": [12, 16], "norm_num_groups": 8}}, "divisible by"),
    ({"train_encoder": False}, "needs a base model"),
    ({"learning_rat": 1.0}, "Unknown config keys"),
    ({"augment": ["rotate", "mirror"]}, "augment: unknown names"),
    ({"augment": "rotate"}, "must be a list of names"),
    ({"augment": None}, "augment must be a list of names from"),
])
def test_invalid_config_rejected(tmp_path, image_folder, changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, image_folder, **changes)


def test_config_yaml_round_trip(tmp_path, image_folder):
    config = tiny_config(tmp_path, image_folder)
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict()))
    assert TrainConfig.from_yaml(path).to_dict() == config.to_dict()


def test_cycle_schedules(tmp_path, image_folder):
    rng = np.random.default_rng(0)
    fixed = tiny_config(tmp_path, image_folder, loss={"cycles": 4, "cycle_schedule": "fixed"})
    assert {train_module.cycle_counts(fixed, step, rng)[0] for step in range(20)} == {4}
    grow = tiny_config(tmp_path, image_folder, steps=100, loss={"cycles": 4, "cycle_schedule": "grow"})
    assert {train_module.cycle_counts(grow, 0, rng)[0] for _ in range(20)} == {1}
    assert max(train_module.cycle_counts(grow, 99, rng)[0] for _ in range(50)) == 4


def test_training_writes_model_and_logs(tmp_path, image_folder):
    config = tiny_config(tmp_path, image_folder)
    final = train_module.train(config)
    vae = load_vae(str(final), cached=False)
    assert vae.config.scaling_factor != 0.18215  # calibrated for a new model
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any("eval/psnr_src_step1" in r for r in records)
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_resume_matches_uninterrupted_run(tmp_path, image_folder):
    whole = tiny_config(tmp_path / "whole", image_folder)
    train_module.train(whole)
    parts = tiny_config(tmp_path / "parts", image_folder)
    stopped = train_module.train(parts, max_steps=3)
    assert stopped.name == "step-00000003"
    train_module.train(parts)

    def losses_of(config):
        lines = (tmp_path / config / "run" / "log.jsonl").read_text().splitlines()
        return [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]

    assert losses_of("parts") == pytest.approx(losses_of("whole"), rel=1e-5)
    whole_weights = load_file(tmp_path / "whole" / "run" / "model" / "diffusion_pytorch_model.safetensors")
    parts_weights = load_file(tmp_path / "parts" / "run" / "model" / "diffusion_pytorch_model.safetensors")
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(parts_weights[name], tensor, rtol=1e-5, atol=1e-6)


def test_decoder_only_keeps_encoder(tmp_path, image_folder):
    base = tiny_config(tmp_path / "base", image_folder, steps=2)
    base_model = train_module.train(base)
    reed = tiny_config(tmp_path / "reed", image_folder, steps=3, base=str(base_model), train_encoder=False)
    reed_model = train_module.train(reed)
    before = load_file(base_model / "diffusion_pytorch_model.safetensors")
    after = load_file(reed_model / "diffusion_pytorch_model.safetensors")
    for name in before:
        if name.startswith(("encoder.", "quant_conv.")):
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    assert not torch.equal(after["decoder.conv_out.weight"], before["decoder.conv_out.weight"])
    reed_vae = load_vae(str(reed_model), cached=False)
    assert reed_vae.config.scaling_factor == load_vae(str(base_model), cached=False).config.scaling_factor


def test_nan_loss_stops_with_step_and_term(tmp_path, image_folder, monkeypatch):
    config = tiny_config(tmp_path, image_folder, checkpoint_every=1)
    original = ReedLoss.forward
    calls = {"count": 0}

    def poisoned(self, vae, images, *args, **kwargs):
        loss, logs = original(self, vae, images, *args, **kwargs)
        calls["count"] += 1
        if calls["count"] == 3:
            logs["l2"] = float("nan")
            return loss * float("nan"), logs
        return loss, logs

    monkeypatch.setattr(ReedLoss, "forward", poisoned)
    with pytest.raises(train_module.TrainingError, match=r"step 3 \(terms: l2\)"):
        train_module.train(config)
    latest = train_module.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest.name == "step-00000002"
    assert load_file(latest / "model.safetensors")


def test_interrupted_checkpoint_keeps_previous(tmp_path, image_folder, monkeypatch):
    config = tiny_config(tmp_path, image_folder, steps=6)
    train_module.train(config, max_steps=3)
    real_save = train_module.save_file

    def crash_on_optimizer(tensors, path, *args, **kwargs):
        if str(path).endswith("optimizer.safetensors"):
            raise KeyboardInterrupt("killed mid-write")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_file", crash_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(config)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert train_module.latest_checkpoint(checkpoints).name == "step-00000003"
    assert (checkpoints / "step-00000006.tmp").is_dir()

    monkeypatch.setattr(train_module, "save_file", real_save)
    final = train_module.train(config)
    assert (final / "diffusion_pytorch_model.safetensors").is_file()


def test_crop_augments_rotate_and_recolor():
    from reed.images import augment_crop

    rng = np.random.default_rng(0)
    ramp = np.broadcast_to(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 16, 3)).copy()
    colour = ramp.copy()
    colour[..., 0] = 200  # a reddish ramp: it has a hue to turn
    rotated = [augment_crop(ramp, ("rotate",), rng) for _ in range(12)]
    assert {r.tobytes() for r in rotated} == {np.rot90(ramp, k).tobytes() for k in range(4)}
    recoloured = [augment_crop(colour, ("recolor",), rng) for _ in range(12)]
    changed = [r for r in recoloured if not np.array_equal(r, colour)]
    assert 0 < len(changed) < len(recoloured)  # about half the crops keep their colours
    tinted = [augment_crop(ramp, ("recolor",), rng) for _ in range(12)]
    grey_lost = [t for t in tinted if np.ptp(t.astype(int), axis=-1).max() > 2]
    assert grey_lost  # a grey crop gets a tint, not a no-op hue turn
    assert all(t.dtype == np.uint8 and t.shape == ramp.shape for t in tinted + recoloured)


def test_augmented_crops_resume_exactly(tmp_path, image_folder):
    from reed.data import make_crops

    config = tiny_config(tmp_path, image_folder, augment=["rotate", "recolor"])
    crops = make_crops(config)
    assert crops.augments == ("rotate", "recolor")
    crops.batch(3)
    saved = crops.state_dict()
    expected = crops.batch(4)
    again = make_crops(config)
    again.load_state_dict(saved)
    assert all(np.array_equal(a, b) for a, b in zip(again.batch(4), expected))
    plain = make_crops(tiny_config(tmp_path, image_folder))
    plain.load_state_dict(saved)
    assert not all(np.array_equal(a, b) for a, b in zip(plain.batch(4), expected))


def test_export_reads_a_checkpoint_folder(tmp_path, image_folder, capsys):
    from reed.cli import main
    from reed.train import load_checkpoint_vae

    config = tiny_config(tmp_path, image_folder, ema_decay=0.5)
    train_module.train(config, max_steps=3)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    trained = load_file(checkpoint / "model.safetensors")
    averaged = load_file(checkpoint / "ema.safetensors")
    name = "decoder.conv_out.weight"
    assert not torch.equal(trained[name], averaged[name])
    for weights, expected in (("trained", trained), ("ema", averaged)):
        out = tmp_path / f"export-{weights}"
        assert main(["export", str(checkpoint), str(out), "--weights", weights]) == 0
        exported = load_file(out / "diffusion_pytorch_model.safetensors")
        torch.testing.assert_close(exported[name], expected[name])
    exported_config = json.loads((tmp_path / "export-trained" / "config.json").read_text())
    assert exported_config["scaling_factor"] != 0.18215  # calibrated for a run from scratch
    assert exported_config["shift_factor"] is not None
    assert not load_checkpoint_vae(checkpoint).training
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        load_checkpoint_vae(tmp_path)
    for run_folder in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
        capsys.readouterr()
        assert main(["export", str(run_folder), str(tmp_path / "export-run")]) == 2
        assert f"for example the latest, {checkpoint}" in capsys.readouterr().err
    assert not (tmp_path / "export-run").exists()
