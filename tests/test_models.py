"""Loading VAEs by reference, and the image<->latent convention."""

from __future__ import annotations

import json
import time

import pytest
import torch

from reed import models
from reed.models import ModelLoadError, decode, encode, load_vae, resolve
from tests.conftest import make_tiny_vae


def test_folder_loads_in_eval_mode(tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    assert not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    assert models.latent_shape(vae) == (4, 2)


def test_cached_and_uncached_loads(tiny_vae_dir):
    assert load_vae(tiny_vae_dir) is load_vae(tiny_vae_dir)
    assert load_vae(tiny_vae_dir, cached=False) is not load_vae(tiny_vae_dir)


def test_pipeline_folder_uses_vae_subfolder(tmp_path):
    make_tiny_vae().save_pretrained(tmp_path / "vae", safe_serialization=True)
    (tmp_path / "model_index.json").write_text("{}")
    location, subfolder = resolve(str(tmp_path))
    assert location == str(tmp_path / "vae")
    assert subfolder is None


def test_pickle_only_folder_rejected(tmp_path):
    vae = make_tiny_vae()
    vae.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ModelLoadError, match="only pickle checkpoints"):
        load_vae(str(tmp_path))


def test_folder_without_weights_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(make_tiny_vae().config)))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_vae(str(tmp_path))


def test_missing_folder_and_bad_names(tmp_path):
    with pytest.raises(ModelLoadError, match="Model folder not found"):
        load_vae(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelLoadError, match="Unknown built-in model 'reed-mini:tiny'"):
        load_vae("reed-mini:tiny")
    with pytest.raises(ModelLoadError, match="owner/name"):
        load_vae("just-a-word")
    with pytest.raises(ModelLoadError, match="non-empty"):
        load_vae("  ")


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="'stabilityai/sd-vae-ft-mse'.*unreachable"):
        load_vae("stabilityai/sd-vae-ft-mse", cached=False)
    assert time.perf_counter() - started < 10


def test_hub_unreachable_names_id(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(address, timeout):
        raise OSError("connection refused")

    monkeypatch.setattr(models.socket, "create_connection", refuse)
    with pytest.raises(ModelLoadError, match="'owner/missing-vae': the Hugging Face Hub .* is unreachable"):
        load_vae("owner/missing-vae", cached=False)


def test_hub_subfolder_reference_splits():
    assert models._split_hub_id("owner/pipeline/vae") == ("owner/pipeline", "vae")
    assert models._split_hub_id("owner/name") == ("owner/name", None)


def test_latent_convention_scale_and_shift():
    vae = make_tiny_vae()
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.25)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    raw = vae.encode(images).latent_dist.mode()
    with torch.no_grad():
        latents = encode(vae, images)
        torch.testing.assert_close(latents, (raw - 0.25) * 0.5)
        torch.testing.assert_close(decode(vae, latents), vae.decode(raw).sample)


def test_missing_shift_means_zero():
    vae = make_tiny_vae()
    vae.register_to_config(scaling_factor=2.0, shift_factor=None)
    assert models.latent_factors(vae) == (2.0, 0.0)


def test_sampled_encode_is_seeded():
    vae = make_tiny_vae()
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        first = encode(vae, images, sample=True, generator=torch.Generator().manual_seed(1))
        second = encode(vae, images, sample=True, generator=torch.Generator().manual_seed(1))
        mean = encode(vae, images)
    torch.testing.assert_close(first, second)
    assert not torch.equal(first, mean)


def test_builtin_models_load():
    for name in models.BUILTIN_MODELS:
        vae = load_vae(name)
        assert models.latent_shape(vae) == (16, 8), name


def test_channels_last_matches_default_layout(tiny_vae_dir, photo):
    from reed.edits.vae_ops import vae_roundtrip

    fast = load_vae(tiny_vae_dir, cached=False, channels_last=True)
    plain = load_vae(tiny_vae_dir, cached=False, channels_last=False)
    assert fast.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    difference = vae_roundtrip(fast, photo).astype(int) - vae_roundtrip(plain, photo)
    assert abs(difference).max() <= 1  # float rounding may move a pixel by one 8-bit level
