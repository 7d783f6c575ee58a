"""Edit chains: text and JSON forms, validation, and runs over several VAEs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reed import chain as chain_module
from reed.chain import (MAX_STEPS, Step, chain_from_json, chain_to_json, chain_to_text, load_chain, parse_chain,
                        run_chain)
from reed.edits import OPERATIONS
from reed.models import load_vae


def test_parse_repeat_and_params():
    steps = parse_chain("roundtrip*10 | rotate degrees=5 | jpeg quality=80 | roundtrip*5")
    assert len(steps) == 17
    assert steps[0] == Step("roundtrip", {})
    assert steps[10] == Step("rotate", {"degrees": 5.0, "fill": "black"})
    assert steps[11].params == {"quality": 80}
    assert steps[-1].op == "roundtrip"


def test_parse_newlines_comments_quotes():
    text = '# a comment line\nroundtrip\n  text text="a | b \\"c\\"" color=#00ff00\nflip direction=vertical'
    steps = parse_chain(text)
    assert [step.op for step in steps] == ["roundtrip", "text", "flip"]
    assert steps[1].params["text"] == 'a | b "c"'
    assert steps[1].params["color"] == "#00ff00"
    assert steps[2].params["direction"] == "vertical"


def test_text_form_round_trip():
    steps = parse_chain('roundtrip*3 | rotate degrees=-2.5 | text text="hello world" | noise sigma=2 | roundtrip*2')
    text = chain_to_text(steps)
    assert text.startswith("roundtrip*3 | rotate degrees=-2.5")
    assert parse_chain(text) == steps


def test_json_form_round_trip():
    steps = parse_chain("roundtrip*4 | jpeg quality=70 | blur radius=0.5")
    data = chain_to_json(steps)
    assert data["steps"][0] == {"op": "roundtrip", "repeat": 4}
    assert chain_from_json(json.dumps(data)) == steps
    assert chain_from_json(data["steps"]) == steps
    assert load_chain(json.dumps(data)) == steps


@pytest.mark.parametrize("text, message", [
    ("sepia", "Unknown operation 'sepia'. Valid operations: blur"),
    ("rotate angle=3", "Unknown parameter 'angle' for operation 'rotate'. Valid parameters: degrees, fill"),
    ("jpeg quality=0", "must be between 1 and 100"),
    ("jpeg quality=85.5", "expected a whole number"),
    ("blur radius=wide", "expected a number"),
    ("flip direction=diagonal", "choose one of: horizontal, vertical"),
    ("rotate degrees=5 extra", "expected key=value"),
    ("rotate degrees=1 degrees=2", "given twice"),
    ('text text="open', "not closed"),
    (f"roundtrip*{MAX_STEPS + 1}", "Chain too long"),
    ("roundtrip*0", "must be at least 1"),
    ("  |  \n ", "empty"),
    ("rot@te", "Invalid step"),
    ("rectangle color=notacolor", "Invalid color 'notacolor'"),
    ("rotate fill=#12", "Invalid color '#12'"),
])
def test_invalid_chains_rejected(text, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("(", r"\(")):
        parse_chain(text)


@pytest.mark.parametrize("data, message", [
    ("{not json", "Invalid chain JSON"),
    ('{"steps": 3}', "expected"),
    ('[{"params": {}}]', '"op" name'),
    ('[{"op": "flip", "times": 2}]', "unknown keys"),
    ('[{"op": "flip", "repeat": "2"}]', "integer"),
    ('[{"op": "flip", "params": {"direction": "up"}}]', "choose one of"),
])
def test_invalid_json_rejected(data, message):
    with pytest.raises(ValueError, match=message):
        chain_from_json(data)


def test_every_operation_keeps_size(photo, tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    odd = np.ascontiguousarray(photo[:37, :51])  # neither side a multiple of the VAE's factor
    for name in OPERATIONS:
        if any(param.required for param in OPERATIONS[name].params):
            continue  # the diffusion edits need a model and a prompt; test_diffusion checks their sizes
        steps = parse_chain(name)
        result = run_chain(odd, steps, {"tiny": vae}, with_lpips=False)
        output = result.images["tiny"][0]
        assert output.shape == odd.shape, name
        assert output.dtype == np.uint8, name


def test_pixel_edits_change_pixels(photo):
    for name in ("crop", "rotate", "flip", "brightness", "contrast", "saturation", "blur", "sharpen",
                 "jpeg", "noise", "paste", "rectangle", "text"):
        result = run_chain(photo, parse_chain(name), {"none": None}, with_lpips=False)
        assert not np.array_equal(result.images["none"][0], photo), name


def test_arms_get_identical_pixel_edits(photo, tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    steps = parse_chain("noise sigma=8 | rotate degrees=7 | jpeg quality=60")
    result = run_chain(photo, steps, {"a": vae, "b": vae}, seed=3, with_lpips=False)
    for image_a, image_b in zip(result.images["a"], result.images["b"]):
        np.testing.assert_array_equal(image_a, image_b)


def test_same_seed_same_pixels(photo, tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    steps = parse_chain("noise | roundtrip*2 | noise sigma=10")
    first = run_chain(photo, steps, {"a": vae}, seed=7, with_lpips=False)
    second = run_chain(photo, steps, {"a": vae}, seed=7, with_lpips=False)
    other = run_chain(photo, steps, {"a": vae}, seed=8, with_lpips=False)
    np.testing.assert_array_equal(first.images["a"][-1], second.images["a"][-1])
    assert not np.array_equal(first.images["a"][-1], other.images["a"][-1])


def test_noise_differs_between_steps(photo):
    result = run_chain(photo, parse_chain("noise*2"), {"none": None}, seed=0, with_lpips=False)
    first_noise = result.images["none"][0].astype(int) - photo
    second_noise = result.images["none"][1].astype(int) - result.images["none"][0]
    assert not np.array_equal(first_noise, second_noise)


def test_rows_and_reference_metrics(photo, tiny_vae_dir, other_tiny_vae_dir):
    arms = {"four": load_vae(tiny_vae_dir), "eight": load_vae(other_tiny_vae_dir)}
    result = run_chain(photo, parse_chain("roundtrip*3"), arms, image_name="cat")
    assert len(result.rows) == 6
    first = [row for row in result.rows if row["step"] == 1]
    assert {row["model"] for row in first} == {"four", "eight"}
    for row in first:
        assert row["psnr_x1"] == 100.0
        assert row["ssim_x1"] == pytest.approx(1.0)
        assert row["mse_x1"] == 0.0
        assert row["lpips_src"] is None or row["lpips_src"] >= 0
    third = next(row for row in result.rows if row["step"] == 3 and row["model"] == "four")
    assert third["psnr_x1"] < 100.0
    assert third["image"] == "cat"
    assert any("different latent shapes" in note for note in result.notes)


def test_lpips_reported_unavailable_not_zero(photo, tiny_vae_dir, monkeypatch):
    monkeypatch.setattr(chain_module.metrics, "load_lpips", lambda net="alex": None)
    result = run_chain(photo, parse_chain("roundtrip"), {"a": load_vae(tiny_vae_dir)})
    assert result.rows[0]["lpips_src"] is None
    assert result.rows[0]["lpips_x1"] is None


def test_roundtrip_uses_arm_vae(photo, tiny_vae_dir, other_tiny_vae_dir):
    arms = {"a": load_vae(tiny_vae_dir), "b": load_vae(other_tiny_vae_dir)}
    result = run_chain(photo, parse_chain("roundtrip"), arms, with_lpips=False)
    assert not np.array_equal(result.images["a"][0], result.images["b"][0])


def test_roundtrip_without_vae_rejected(photo):
    with pytest.raises(ValueError, match="needs a VAE"):
        run_chain(photo, parse_chain("roundtrip"), {"none": None}, with_lpips=False)


def test_progress_called_per_step(photo, tiny_vae_dir):
    calls = []
    run_chain(photo, parse_chain("roundtrip*2 | flip"), {"a": load_vae(tiny_vae_dir), "b": load_vae(tiny_vae_dir)},
              progress=lambda done, total, message: calls.append((done, total)), with_lpips=False)
    assert calls == [(i, 6) for i in range(1, 7)]
