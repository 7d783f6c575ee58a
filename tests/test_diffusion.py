"""Diffusion edits (ip2p, inpaint, pbe) on tiny random pipelines, the table1 benchmark, and their app parts.

The pipelines come from ``tiny_pipelines``: real diffusers classes with random weights, saved as
safetensors folders and passed as ``model=``. They run on the CPU (``REED_DIFFUSION_DEVICE=cpu``), so
these tests do not reach the float16 path that a CUDA machine takes.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import tiny_pipelines
from conftest import make_tiny_vae
from demo import handlers, runs, ui
from reed import fid, report, table1
from reed.chain import chain_to_text, parse_chain, run_chain
from reed.cli import main
from reed.edits import EditContext, get_operation
from reed.edits import diffusion, pipelines
from reed.models import ModelLoadError

STEPS = 2


@pytest.fixture(autouse=True)
def cpu_pipelines(monkeypatch):
    monkeypatch.setenv(pipelines.DEVICE_VARIABLE, "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "ip2p": tiny_pipelines.save_ip2p(root / "ip2p"),
        "inpaint": tiny_pipelines.save_inpaint(root / "inpaint"),
        "pbe": tiny_pipelines.save_pbe(root / "pbe"),
        "ip2p_scaled": tiny_pipelines.save_ip2p(root / "ip2p-scaled", scaling_factor=0.5),
    }


@pytest.fixture(scope="module")
def arm_dirs(tmp_path_factory) -> dict[str, str]:
    """Two tiny 4-channel VAEs with different weights, saved as folders."""
    root = tmp_path_factory.mktemp("arms")
    folders = {}
    for name, seed in (("vae-a", 0), ("vae-b", 2)):
        make_tiny_vae(seed=seed).save_pretrained(root / name, safe_serialization=True)
        folders[name] = str(root / name)
    return folders


@pytest.fixture(scope="module")
def reference_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("reference") / "reference.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def image(photo) -> np.ndarray:
    """A 32x48 crop of a bundled photo."""
    return np.ascontiguousarray(photo[:32, :48])


def run_op(name: str, image: np.ndarray, vae, seed: int = 3, **params) -> np.ndarray:
    operation = get_operation(name)
    resolved = operation.resolve(params)
    return operation.function(image, EditContext(vae=vae, seed=seed), **resolved)


def op_params(name: str, pipeline_dirs, reference_path) -> dict:
    """Parameters that make each operation run on its tiny pipeline."""
    params = {"model": pipeline_dirs[name], "steps": STEPS}
    if name == "ip2p":
        params["prompt"] = "make it winter"
    if name == "inpaint":
        params.update(prompt="a red ball", mask="8,4,16,12")
    if name == "pbe":
        params.update(reference=reference_path, mask="8,4,16,12")
    return params


class CallCounter:
    """Replace a VAE's encode and decode with wrappers that count their calls."""

    def __init__(self, vae, monkeypatch):
        self.encode = self.decode = 0
        original_encode, original_decode = vae.encode, vae.decode

        def encode(*args, **kwargs):
            self.encode += 1
            return original_encode(*args, **kwargs)

        def decode(*args, **kwargs):
            self.decode += 1
            return original_decode(*args, **kwargs)

        monkeypatch.setattr(vae, "encode", encode)
        monkeypatch.setattr(vae, "decode", decode)


# Operations


@pytest.mark.parametrize("name, encodes", [("ip2p", 1), ("inpaint", 2), ("pbe", 1)])
def test_op_encodes_and_decodes_with_arm_vae(name, encodes, image, pipeline_dirs, reference_path, monkeypatch):
    params = op_params(name, pipeline_dirs, reference_path)
    arm = make_tiny_vae(seed=0)
    own = pipelines.load_pipeline(name, params["model"]).vae
    arm_calls, own_calls = CallCounter(arm, monkeypatch), CallCounter(own, monkeypatch)

    run_op(name, image, arm, **params)

    assert arm_calls.encode == encodes
    assert arm_calls.decode == 1
    assert own_calls.encode == 0
    assert own_calls.decode == 0


@pytest.mark.parametrize("name", ["ip2p", "inpaint", "pbe"])
def test_op_output_depends_only_on_vae(name, image, pipeline_dirs, reference_path):
    params = op_params(name, pipeline_dirs, reference_path)
    vae = make_tiny_vae(seed=0)

    first = run_op(name, image, vae, **params)
    same_weights = run_op(name, image, copy.deepcopy(vae), **params)
    other_weights = run_op(name, image, make_tiny_vae(seed=2), **params)

    np.testing.assert_array_equal(first, same_weights)
    assert not np.array_equal(first, other_weights)


@pytest.mark.parametrize("name", ["ip2p", "inpaint", "pbe"])
def test_op_seed_reproducible(name, image, pipeline_dirs, reference_path):
    params = op_params(name, pipeline_dirs, reference_path)
    vae = make_tiny_vae(seed=0)

    first = run_op(name, image, vae, seed=3, **params)
    rerun = run_op(name, image, vae, seed=3, **params)
    other_seed = run_op(name, image, vae, seed=4, **params)

    np.testing.assert_array_equal(first, rerun)
    assert not np.array_equal(first, other_seed)


def test_seed_param_overrides_step_seed(image, pipeline_dirs, reference_path):
    operation = get_operation("ip2p")
    params = operation.resolve({**op_params("ip2p", pipeline_dirs, reference_path), "seed": 11})
    vae = make_tiny_vae(seed=0)

    from_step_3 = operation.function(image, EditContext(vae=vae, seed=3), **params)
    from_step_4 = operation.function(image, EditContext(vae=vae, seed=4), **params)

    np.testing.assert_array_equal(from_step_3, from_step_4)


@pytest.mark.parametrize("name", ["ip2p", "inpaint", "pbe"])
def test_op_keeps_odd_size(name, photo, pipeline_dirs, reference_path):
    odd = np.ascontiguousarray(photo[:37, :45])
    output = run_op(name, odd, make_tiny_vae(seed=0), **op_params(name, pipeline_dirs, reference_path))
    assert output.shape == odd.shape
    assert output.dtype == np.uint8


@pytest.mark.parametrize("name", ["inpaint", "pbe"])
def test_keep_unmasked_leaves_outside_unchanged(name, image, pipeline_dirs, reference_path, tmp_path):
    mask_file = tmp_path / "mask.png"
    mask_pixels = np.zeros((64, 96), dtype=np.uint8)  # twice the image size: resized to it
    mask_pixels[10:40, 20:60] = 255
    Image.fromarray(mask_pixels).save(mask_file)
    vae = make_tiny_vae(seed=0)
    for mask in ("8,4,16,12", str(mask_file)):
        params = {**op_params(name, pipeline_dirs, reference_path), "mask": mask}
        region = diffusion.load_mask(mask, *image.shape[:2])

        kept = run_op(name, image, vae, **params, keep_unmasked=True)
        replaced = run_op(name, image, vae, **params)

        np.testing.assert_array_equal(kept[~region], image[~region])
        np.testing.assert_array_equal(kept[region], replaced[region])
        assert not np.array_equal(replaced[~region], image[~region])


def test_mask_rectangle_clipped_to_image():
    region = diffusion.load_mask("30,20,100,100", 32, 48)
    assert region.shape == (32, 48)
    assert region[20:, 30:].all()
    assert region.sum() == 12 * 18


@pytest.mark.parametrize("value, fragment", [
    ("100,100,4,4", "selects no pixel"),
    ("4,4,0,8", "at least 1 pixel"),
    ("no-such-file.png", "expected a rectangle x,y,w,h"),
])
def test_mask_invalid_values(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        diffusion.check_mask(value)
        diffusion.load_mask(value, 32, 48)


# Chains


def test_chain_text_round_trip(pipeline_dirs):
    text = (f'roundtrip*3 | ip2p model={pipeline_dirs["ip2p"]} prompt="make it winter" steps=2 | jpeg quality=80 | '
            f'inpaint model={pipeline_dirs["inpaint"]} mask=16,16,64,64 prompt="a red ball" steps=2')
    steps = parse_chain(text)
    assert [step.op for step in steps] == ["roundtrip"] * 3 + ["ip2p", "jpeg", "inpaint"]
    assert steps[5].params["mask"] == "16,16,64,64"
    assert steps[5].params["keep_unmasked"] is False
    assert parse_chain(chain_to_text(steps)) == steps


def test_chain_arms_share_seeds(image, pipeline_dirs, reference_path):
    steps = parse_chain(f'ip2p model={pipeline_dirs["ip2p"]} prompt="make it winter" steps=2 | '
                        f'pbe model={pipeline_dirs["pbe"]} reference={reference_path} mask=8,4,16,12 steps=2')
    vae = make_tiny_vae(seed=0)

    result = run_chain(image, steps, {"a": vae, "same weights": copy.deepcopy(vae)}, seed=5, with_lpips=False)

    for first, second in zip(result.images["a"], result.images["same weights"]):
        np.testing.assert_array_equal(first, second)


def test_unloadable_model_fails_before_any_step(image, tmp_path):
    missing = str(tmp_path / "no-such-pipeline")
    steps = parse_chain(f'roundtrip | ip2p model={missing} prompt="make it winter"')
    progress = []

    with pytest.raises(ModelLoadError, match="no-such-pipeline"):
        run_chain(image, steps, {"a": make_tiny_vae(seed=0)}, progress=lambda *args: progress.append(args))

    assert progress == []


def test_uncached_hub_model_offline_names_model(image):
    steps = parse_chain('roundtrip | inpaint model=reed-tests/not-downloaded prompt="x" mask=0,0,8,8')
    with pytest.raises(ModelLoadError) as error:
        run_chain(image, steps, {"a": make_tiny_vae(seed=0)})
    assert "reed-tests/not-downloaded" in str(error.value)
    assert "hf download reed-tests/not-downloaded" in str(error.value)


def test_latent_channel_mismatch_fails_before_any_step(image, pipeline_dirs):
    steps = parse_chain(f'roundtrip | ip2p model={pipeline_dirs["ip2p"]} prompt="make it winter"')
    arms = {"four": make_tiny_vae(seed=0), "eight": make_tiny_vae(seed=1, latent_channels=8)}
    progress = []

    with pytest.raises(ValueError, match="eight has 8 channels at factor 2"):
        run_chain(image, steps, arms, progress=lambda *args: progress.append(args))

    assert progress == []


def test_scaling_mismatch_is_a_note(image, pipeline_dirs):
    steps = parse_chain(f'ip2p model={pipeline_dirs["ip2p_scaled"]} prompt="make it winter" steps=2')
    result = run_chain(image, steps, {"a": make_tiny_vae(seed=0)}, with_lpips=False)
    assert any("scaling_factor 0.18215" in note and "0.5" in note for note in result.notes)


def test_unavailable_reason_offline_and_local(pipeline_dirs, tmp_path):
    assert "HF_HUB_OFFLINE" in pipelines.unavailable_reason("ip2p")
    assert pipelines.unavailable_reason("ip2p", pipeline_dirs["ip2p"]) is None
    assert "no model_index.json" in pipelines.unavailable_reason("pbe", str(tmp_path))


# Command line


def test_cli_chain_runs_diffusion_steps(tmp_path, photo, arm_dirs, pipeline_dirs):
    source = tmp_path / "photo.png"
    Image.fromarray(photo).save(source)
    chain = (f'roundtrip*3 | ip2p model={pipeline_dirs["ip2p"]} prompt="make it winter" steps=2 | jpeg quality=85 | '
             f'inpaint model={pipeline_dirs["inpaint"]} mask=16,16,64,64 prompt="a red ball" steps=2')

    code = main(["chain", str(source), "--chain", chain, "--models", f'{arm_dirs["vae-a"]},{arm_dirs["vae-b"]}',
                 "--out", str(tmp_path / "out")])

    assert code == 0
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [row["op"] for row in rows if row["model"] == arm_dirs["vae-a"]][3:] == ["ip2p", "jpeg", "inpaint"]


def test_cli_chain_reports_missing_pipeline(tmp_path, photo, arm_dirs, capsys):
    source = tmp_path / "photo.png"
    Image.fromarray(photo).save(source)
    missing = str(tmp_path / "missing-pipeline")

    code = main(["chain", str(source), "--chain", f'ip2p model={missing} prompt="x"', "--models",
                 f'{arm_dirs["vae-a"]},{arm_dirs["vae-b"]}', "--out", str(tmp_path / "out")])

    assert code == 2
    assert "missing-pipeline" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


# table1


@pytest.fixture
def samples_dir(tmp_path, photo) -> Path:
    folder = tmp_path / "samples"
    folder.mkdir()
    Image.fromarray(np.ascontiguousarray(photo[:32, :32])).save(folder / "left.png")
    Image.fromarray(np.ascontiguousarray(photo[8:40, 24:56])).save(folder / "right.png")
    (folder / "manifest.csv").write_text(
        "image,instruction,reverse_instruction,mask\n"
        'left.png,make it winter,make it summer,"4,4,16,16"\n'
        "right.png,add snow,remove the snow,\n", encoding="utf-8")
    return folder


def test_table1_cli_writes_snapshots_and_resumes(tmp_path, samples_dir, arm_dirs, pipeline_dirs, capsys):
    out = tmp_path / "table1"
    argv = ["table1", str(samples_dir), "--models", f'{arm_dirs["vae-a"]},{arm_dirs["vae-b"]}', "--editor", "ip2p",
            "--model", pipeline_dirs["ip2p"], "--steps-per-edit", "2", "--size", "32", "--no-lpips", "--out", str(out)]

    assert main(argv) == 0

    for sample in ("left", "right"):
        for model in ("vae-a", "vae-b"):
            folder = out / "samples" / sample / report.safe_name(arm_dirs[model])
            assert sorted(path.name for path in folder.glob("*.png")) == [
                "step-01.png", "step-05.png", "step-15.png", "step-25.png"]
    results = json.loads((out / "metrics.json").read_text())
    assert [(entry["model"], entry["step"]) for entry in results["summary"]] == [
        (arm_dirs[model], step) for model in ("vae-a", "vae-b") for step in (1, 5, 15, 25)]
    assert all(entry["lpips"] is None and entry["fid"] is None for entry in results["summary"])
    assert all(entry["samples"] == 2 for entry in results["summary"])
    assert results["summary"][1]["psnr"] < 100
    assert "| step |" in (out / "table1.md").read_text()
    capsys.readouterr()

    assert main(argv) == 0
    assert "Skipped 2 samples" in capsys.readouterr().out


def test_table1_resume_skips_finished_samples(tmp_path, samples_dir, monkeypatch):
    arms = {"a": make_tiny_vae(seed=0), "b": make_tiny_vae(seed=2)}
    config = table1.Table1Config(editor="inpaint", models=list(arms), edits=5, snapshots=(1, 3, 5), size=32,
                                 op_params={"model": "unused/never-loaded"}, default_mask="0,0,8,8")
    samples = table1.load_manifest(samples_dir)
    calls = []

    def fake_run_sample(sample, vaes, config, out, with_lpips):
        calls.append(sample.name)
        rows = [{"image": sample.name, "model": model, "step": step, "mse_x1": 0.1 * step, "psnr_x1": 20.0,
                 "ssim_x1": 0.5, "lpips_x1": None} for model in vaes for step in config.snapshots]
        folder = Path(out) / "samples" / sample.name
        for model in vaes:
            (folder / model).mkdir(parents=True, exist_ok=True)
            for step in config.snapshots:
                pixels = np.full((8, 8, 3), step * 10, dtype=np.uint8)
                pixels[0, 0] = len(calls)
                Image.fromarray(pixels).save(folder / model / f"step-{step:02d}.png")
        (folder / "sample.json").write_text(json.dumps({"sample": sample.name, "rows": rows, "notes": []}))
        return {"rows": rows, "notes": []}

    monkeypatch.setattr(table1, "_run_sample", fake_run_sample)
    features = lambda images: np.stack([image.reshape(-1)[:4].astype(float) for image in images])  # noqa: E731

    first = table1.run_table1(samples[:1], arms, config, tmp_path / "out", with_lpips=False, features=features)
    second = table1.run_table1(samples, arms, config, tmp_path / "out", with_lpips=False, features=features)

    assert calls == ["left", "right"]
    assert first["skipped"] == []
    assert second["skipped"] == ["left"]
    fids = {(entry["model"], entry["step"]): entry["fid"] for entry in second["summary"]}
    assert fids[("a", 1)] == pytest.approx(0.0, abs=1e-6)
    assert fids[("a", 5)] > fids[("a", 3)] > 0


def test_table1_rejects_changed_settings(tmp_path, samples_dir, monkeypatch):
    arms = {"a": make_tiny_vae(seed=0), "b": make_tiny_vae(seed=2)}
    monkeypatch.setattr(table1, "_run_sample", lambda *args: pytest.fail("no sample may run"))
    samples = table1.load_manifest(samples_dir)
    first = table1.Table1Config(editor="ip2p", models=list(arms), edits=5, snapshots=(1, 5), seed=0)
    table1._check_config(first, tmp_path)
    finished = tmp_path / "samples" / "left" / "sample.json"
    finished.parent.mkdir(parents=True)
    finished.write_text("{}", encoding="utf-8")
    changed = table1.Table1Config(editor="ip2p", models=list(arms), edits=5, snapshots=(1, 5), seed=1)

    with pytest.raises(ValueError, match="seed differ"):
        table1.run_table1(samples, arms, changed, tmp_path)


def test_table1_replaces_unfinished_run_settings(tmp_path):
    first = table1.Table1Config(editor="ip2p", models=["a", "b"], edits=5, snapshots=(1, 5), seed=0)
    table1._check_config(first, tmp_path)  # the run then stops before any sample finishes
    changed = table1.Table1Config(editor="ip2p", models=["a", "b"], edits=5, snapshots=(1, 5), seed=1)

    table1._check_config(changed, tmp_path)

    assert json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))["seed"] == 1


def test_table1_alternates_instructions(samples_dir):
    sample = table1.load_manifest(samples_dir)[0]
    config = table1.Table1Config(editor="ip2p", models=["a", "b"], edits=4, snapshots=(1, 4),
                                 op_params={"steps": 2})
    prompts = [step.params["prompt"] for step in table1.editor_steps(config, sample)]
    assert prompts == ["make it winter", "make it summer", "make it winter", "make it summer"]

    inpaint = table1.Table1Config(editor="inpaint", models=["a", "b"], edits=3, snapshots=(1, 3))
    steps = table1.editor_steps(inpaint, sample)
    assert len(set(steps)) == 1
    assert steps[0].params["mask"] == "4,4,16,16"
    assert steps[0].params["prompt"] == "make it winter"


def test_table1_sample_without_field_fails(samples_dir):
    samples = table1.load_manifest(samples_dir)
    config = table1.Table1Config(editor="inpaint", models=["a", "b"], edits=3, snapshots=(1, 3))
    with pytest.raises(ValueError, match="Sample 'right' has no mask"):
        table1.editor_steps(config, samples[1])


@pytest.mark.parametrize("kwargs, fragment", [
    ({"models": ["a"]}, "two or more different VAEs"),
    ({"snapshots": (5, 25)}, "must include step 1"),
    ({"snapshots": (1, 30)}, "beyond the last edit"),
    ({"editor": "sdedit"}, "Unknown editor"),
])
def test_table1_config_validation(kwargs, fragment):
    settings = {"editor": "ip2p", "models": ["a", "b"], **kwargs}
    with pytest.raises(ValueError, match=fragment):
        table1.Table1Config(**settings)


# table1 published numbers

TEMPLATE = Path(__file__).resolve().parents[1] / "benchmarks" / "table1_reference_template.json"
PUBLISHED = {
    "source": "Test source, Table 1, InstructPix2Pix rows",
    "editor": "ip2p",
    "rows": [
        {"model": "REED-VAE", "step": 3, "psnr": 30.5},
        {"model": "REED-VAE", "step": 5, "mse": 0.00125, "psnr": 27.125, "ssim": 0.8125, "lpips": None, "fid": 12.5},
        {"model": "Vanilla VAE", "step": 5, "psnr": 21.25},
    ],
}


def published(**changes) -> dict:
    """Return a copy of PUBLISHED with top-level keys, or with ``row`` merged into its first row, changed."""
    data = copy.deepcopy(PUBLISHED)
    data["rows"][0].update(changes.pop("row", {}))
    data.update(changes)
    return data


def write_published(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_table1_cli_writes_published_table(tmp_path, samples_dir, arm_dirs, pipeline_dirs):
    out = tmp_path / "table1"
    reference = write_published(tmp_path / "published.json", PUBLISHED)
    models = [arm_dirs["vae-a"], arm_dirs["vae-b"]]
    argv = ["table1", str(samples_dir), "--models", ",".join(models), "--editor", "ip2p",
            "--model", pipeline_dirs["ip2p"], "--edits", "5", "--snapshots", "1,3,5", "--steps-per-edit", "2",
            "--size", "32", "--no-lpips", "--out", str(out), "--reference", str(reference)]

    assert main(argv) == 0

    markdown = (out / "table1.md").read_text(encoding="utf-8")
    ours, _, theirs = markdown.partition("## Published numbers (source: Test source, Table 1, InstructPix2Pix rows)")
    assert theirs, markdown
    assert f"| {models[0]} | 5 |" in ours
    assert "| REED-VAE | 3 | — | 30.5 | — | — | — |" in theirs
    assert "| REED-VAE | 5 | 0.00125 | 27.125 | 0.8125 | — | 12.5 |" in theirs
    assert "| Vanilla VAE | 3 | — | — | — | — | — |" in theirs
    assert "| Vanilla VAE | 5 | — | 21.25 | — | — | — |" in theirs
    assert ours.count("| VAE | step |") == theirs.count("| VAE | step |") == 1

    results = json.loads((out / "metrics.json").read_text())
    assert results["reference"]["source"] == PUBLISHED["source"]
    assert results["reference"]["editor"] == "ip2p"
    assert results["reference"]["file"] == str(reference)
    assert results["reference"]["rows"][1] == {"model": "REED-VAE", "step": 5, "mse": 0.00125, "psnr": 27.125,
                                               "ssim": 0.8125, "lpips": None, "fid": 12.5}
    assert results["reference"]["rows"][0]["fid"] is None

    csv_models = [line.split(",")[0] for line in (out / "table1.csv").read_text().splitlines()[1:]]
    assert csv_models == [models[0], models[0], models[1], models[1]]


def test_table1_reference_csv_matches_json(tmp_path):
    config = table1.Table1Config(editor="ip2p", models=["a", "b"], edits=5, snapshots=(1, 3, 5))
    path = tmp_path / "published.csv"
    path.write_text(
        "\ufeffsource,editor,model,step,mse,psnr,ssim,lpips,fid\n"
        '"Test source, Table 1, InstructPix2Pix rows",ip2p,REED-VAE,3,,30.5,,,\n'
        '"Test source, Table 1, InstructPix2Pix rows",ip2p,REED-VAE,5,0.00125,27.125,0.8125,,12.5\n'
        '"Test source, Table 1, InstructPix2Pix rows",ip2p,Vanilla VAE, 5 ,,21.25,,,\n', encoding="utf-8")

    from_csv = table1.load_reference(path, config)
    from_json = table1.load_reference(write_published(tmp_path / "published.json", PUBLISHED), config)

    assert from_csv.rows == from_json.rows
    assert from_csv.source == from_json.source == PUBLISHED["source"]
    assert from_csv.editor == "ip2p"


def test_table1_reference_template_needs_numbers(tmp_path):
    config = table1.Table1Config(editor="ip2p", models=["a", "b"])
    template = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    assert all(row[metric] is None for row in template["rows"] for metric in table1.SUMMARY_METRICS)

    with pytest.raises(ValueError, match="template's placeholder"):
        table1.load_reference(TEMPLATE, config)

    template["source"] = "Test source"
    with pytest.raises(ValueError, match="contains no numbers"):
        table1.load_reference(write_published(tmp_path / "unfilled.json", template), config)

    template["rows"][0]["psnr"] = 25.0
    filled = table1.load_reference(write_published(tmp_path / "filled.json", template), config)
    assert [(row.model, row.step) for row in filled.rows] == [
        (model, step) for model in ("Vanilla VAE", "REED-VAE") for step in (5, 15, 25)]


@pytest.mark.parametrize("name, kind, content, error, fragment", [
    ("unknown-metric.json", "json", published(row={"clip": 0.3}), ValueError, r"rows\[0\]: unknown fields \['clip'\]"),
    ("unknown-metric.csv", "text", "source,editor,model,step,clip\nS,ip2p,REED-VAE,5,0.3\n", ValueError,
     r"unknown columns \['clip'\]"),
    ("text-value.json", "json", published(row={"psnr": "27.1"}), ValueError, "psnr '27.1' is not a finite number"),
    ("bool-value.json", "json", published(row={"ssim": True}), ValueError, "ssim True is not a finite number"),
    ("nan-value.json", "text", '{"source": "S", "editor": "ip2p", "rows": [{"model": "M", "step": 5, "psnr": NaN}]}',
     ValueError, "psnr nan is not a finite number"),
    ("text-value.csv", "text", "source,editor,model,step,psnr\nS,ip2p,REED-VAE,5,n/a\n", ValueError,
     "line 2: psnr 'n/a' is not a number"),
    ("text-step.csv", "text", "source,editor,model,step,psnr\nS,ip2p,REED-VAE,five,20\n", ValueError,
     "line 2: step 'five' is not an integer"),
    ("no-source.json", "json", {key: value for key, value in PUBLISHED.items() if key != "source"}, ValueError,
     "missing source"),
    ("no-source.csv", "text", "source,editor,model,step,psnr\n,ip2p,REED-VAE,5,20\n", ValueError, "missing source"),
    ("mixed-source.csv", "text", "source,editor,model,step,psnr\nA,ip2p,M,5,20\nB,ip2p,N,5,21\n", ValueError,
     "same value on every row"),
    ("no-step-column.csv", "text", "source,editor,model,psnr\nS,ip2p,M,20\n", ValueError,
     r"missing columns \['step'\]"),
    ("unknown-step.json", "json", published(row={"step": 10}), ValueError,
     r"rows\[0\]: step 10 is not a step of this run's table \[3, 5\]"),
    ("first-step.json", "json", published(row={"step": 1}), ValueError, "step 1 is not a step of this run's table"),
    ("wrong-editor.json", "json", published(editor="inpaint"), ValueError,
     "editor is 'inpaint' but this run uses 'ip2p'"),
    ("no-editor.json", "json", published(editor=None), ValueError, "missing editor"),
    ("duplicate.json", "json", published(row={"step": 5}), ValueError,
     "model 'REED-VAE' has more than one row for step 5"),
    ("no-model.json", "json", published(row={"model": " "}), ValueError, "model must be a non-empty name"),
    ("extra-key.json", "json", published(notes="x"), ValueError, r"unknown keys \['notes'\]"),
    ("rows-object.json", "json", published(rows={"model": "M"}), ValueError, "must be a list of objects"),
    ("broken.json", "text", '{"source": "S",', ValueError, "invalid JSON"),
    ("numbers.txt", "text", "S", ValueError, r"must end in \.csv or \.json"),
    ("latin-1.csv", "bytes", "source,editor,model,step\nS\xe9,ip2p,M,5\n".encode("latin-1"), ValueError,
     "Could not read"),
    ("folder.json", "folder", None, ValueError, "Could not read"),
    ("missing.json", "missing", None, FileNotFoundError, "not found"),
])
def test_table1_rejects_bad_reference(name, kind, content, error, fragment, tmp_path, samples_dir, monkeypatch):
    monkeypatch.setattr(table1, "_run_sample", lambda *args: pytest.fail("no sample may run"))
    path = tmp_path / name
    if kind == "json":
        path.write_text(json.dumps(content), encoding="utf-8")
    elif kind == "text":
        path.write_text(content, encoding="utf-8")
    elif kind == "bytes":
        path.write_bytes(content)
    elif kind == "folder":
        path.mkdir()
    arms = {"a": make_tiny_vae(seed=0), "b": make_tiny_vae(seed=2)}
    config = table1.Table1Config(editor="ip2p", models=list(arms), edits=5, snapshots=(1, 3, 5), size=32)
    out = tmp_path / "out"

    with pytest.raises(error, match=fragment) as raised:
        table1.run_table1(table1.load_manifest(samples_dir), arms, config, out, with_lpips=False, reference=path)

    assert str(path) in str(raised.value)
    assert not (out / "samples").exists()
    assert not (out / "config.json").exists()


def test_table1_cli_checks_reference_before_models(tmp_path, samples_dir, capsys):
    reference = write_published(tmp_path / "published.json", published(editor="pbe"))
    out = tmp_path / "table1"
    argv = ["table1", str(samples_dir), "--models", f"{tmp_path / 'no-vae-a'},{tmp_path / 'no-vae-b'}",
            "--editor", "ip2p", "--out", str(out), "--reference", str(reference)]

    assert main(argv) == 2

    assert "editor is 'pbe' but this run uses 'ip2p'" in capsys.readouterr().err
    assert not out.exists()


def test_table1_resume_accepts_other_reference(tmp_path, samples_dir, monkeypatch):
    calls = []

    def fake_run_sample(sample, vaes, config, out, with_lpips):
        calls.append(sample.name)
        rows = [{"image": sample.name, "model": model, "step": step, "mse_x1": 0.01, "psnr_x1": 20.0,
                 "ssim_x1": 0.5, "lpips_x1": None} for model in vaes for step in config.snapshots]
        record = {"sample": sample.name, "rows": rows, "notes": []}
        folder = Path(out) / "samples" / sample.name
        folder.mkdir(parents=True)
        (folder / "sample.json").write_text(json.dumps(record))
        return record

    monkeypatch.setattr(table1, "_run_sample", fake_run_sample)
    arms = {"a": make_tiny_vae(seed=0), "b": make_tiny_vae(seed=2)}
    config = table1.Table1Config(editor="ip2p", models=list(arms), edits=5, snapshots=(1, 3, 5), size=32)
    samples = table1.load_manifest(samples_dir)
    first_file = write_published(tmp_path / "first.json", published(source="First source"))
    second_file = write_published(tmp_path / "second.json", published(source="Second source"))

    first = table1.run_table1(samples, arms, config, tmp_path / "out", with_lpips=False, reference=first_file)
    second = table1.run_table1(samples, arms, config, tmp_path / "out", with_lpips=False, reference=second_file)
    third = table1.run_table1(samples, arms, config, tmp_path / "out", with_lpips=False)

    assert calls == ["left", "right"]
    assert first["reference"]["source"] == "First source"
    assert second["skipped"] == ["left", "right"]
    assert second["reference"]["source"] == "Second source"
    assert "reference" not in third
    assert "Published numbers" not in (tmp_path / "out" / "table1.md").read_text(encoding="utf-8")


def test_table1_loaded_reference_wrong_editor(tmp_path, samples_dir, monkeypatch):
    monkeypatch.setattr(table1, "_run_sample", lambda *args: pytest.fail("no sample may run"))
    arms = {"a": make_tiny_vae(seed=0), "b": make_tiny_vae(seed=2)}
    inpaint = table1.Table1Config(editor="inpaint", models=list(arms), edits=5, snapshots=(1, 3, 5))
    ip2p = table1.Table1Config(editor="ip2p", models=list(arms), edits=5, snapshots=(1, 3, 5))
    numbers = table1.load_reference(write_published(tmp_path / "inpaint.json", published(editor="inpaint")), inpaint)

    with pytest.raises(ValueError, match="for the inpaint editor, but this run uses ip2p"):
        table1.run_table1(table1.load_manifest(samples_dir), arms, ip2p, tmp_path / "out", reference=numbers)
    assert not (tmp_path / "out").exists()


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 3))

    assert fid.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert fid.frechet_distance(features, features + np.array([3.0, 0.0, 4.0])) == pytest.approx(25.0, rel=1e-6)


def test_fid_unavailable_is_none():
    images = [np.zeros((8, 8, 3), dtype=np.uint8)] * 2
    if fid.load_inception() is not None:
        pytest.skip("pytorch-fid and its weights are installed here")
    assert fid.fid(images, images) is None
    assert fid.fid_unavailable_reason()


# App


@pytest.fixture
def isolated_app_folders(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setattr(runs, "RUNS_ROOT", root)
    monkeypatch.setattr(handlers, "EXAMPLES_FOLDER", tmp_path / "examples")
    monkeypatch.setattr(handlers, "INPUTS_FOLDER", tmp_path / "inputs")
    monkeypatch.setattr(handlers, "new_run_folder", lambda: runs.new_run_folder(root))


def test_app_marks_unavailable_operations(pipeline_dirs):
    labels = dict((name, label) for label, name in handlers.operation_choices())
    assert labels["roundtrip"] == "roundtrip"
    assert "unavailable" in labels["ip2p"]
    assert "HF_HUB_OFFLINE" in handlers.operation_help("pbe")


def test_app_save_mask_marks_painted_pixels(isolated_app_folders):
    layer = np.zeros((16, 24, 4), dtype=np.uint8)
    layer[2:6, 3:9] = (255, 0, 255, 255)

    path = handlers.save_mask({"background": None, "layers": [layer], "composite": None})

    mask = np.asarray(Image.open(path))
    assert mask.shape == (16, 24)
    assert (mask[2:6, 3:9] == 255).all()
    assert mask.sum() == 255 * 4 * 6
    assert handlers.save_mask({"layers": [layer]}) == path


def test_app_save_mask_rejects_empty_drawing(isolated_app_folders):
    with pytest.raises(gr.Error, match="empty"):
        handlers.save_mask({"layers": [np.zeros((8, 8, 4), dtype=np.uint8)]})
    with pytest.raises(gr.Error, match="Paint over"):
        handlers.save_mask(None)


def test_app_fills_mask_box(isolated_app_folders):
    layer = np.zeros((8, 8, 4), dtype=np.uint8)
    layer[1:3, 1:3, 3] = 255
    updates = ui._use_mask("inpaint", {"layers": [layer]})
    index = handlers.parameter_index("inpaint", "mask")
    assert Path(updates[index].value).is_file()
    with pytest.raises(gr.Error, match="has no mask"):
        ui._use_mask("rotate", {"layers": [layer]})


def test_app_runs_diffusion_chain(isolated_app_folders, photo, tmp_path, arm_dirs, pipeline_dirs, reference_path):
    photo_path = tmp_path / "photo.png"
    Image.fromarray(photo).save(photo_path)
    reference = handlers.save_reference(reference_path)
    chain = (f'roundtrip | ip2p model={pipeline_dirs["ip2p"]} prompt="make it winter" steps=2 | jpeg quality=85 | '
             f'inpaint model={pipeline_dirs["inpaint"]} mask=16,16,64,64 prompt="a red ball" steps=2 | '
             f'pbe model={pipeline_dirs["pbe"]} reference={reference} mask=0,0,16,16 steps=2')

    result = handlers.run_comparison(str(photo_path), chain, arm_dirs["vae-a"], arm_dirs["vae-b"], 64, 0)

    assert result.record.step_count == 5
    assert result.view.images[arm_dirs["vae-a"]].shape == (64, 88, 3)


def test_app_rejects_file_outside_temp(pipeline_dirs):
    outside = Path(os.__file__)  # the standard library, which is never under the temp directory
    chain = f'inpaint model={pipeline_dirs["inpaint"]} mask={outside} prompt="x"'
    with pytest.raises(gr.Error, match="outside the app's upload folder"):
        handlers.parse_app_chain(chain)


def test_app_missing_pipeline_raises_gr_error(isolated_app_folders, photo, tmp_path, arm_dirs):
    photo_path = tmp_path / "photo.png"
    Image.fromarray(photo).save(photo_path)
    with pytest.raises(gr.Error, match="not-downloaded"):
        handlers.run_comparison(str(photo_path), 'ip2p model=reed-tests/not-downloaded prompt="x"',
                                arm_dirs["vae-a"], arm_dirs["vae-b"], 64, 0)
