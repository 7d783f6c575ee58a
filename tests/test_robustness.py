"""Bad input through the command line (``reed.cli.main``) and the app's handler (``run_comparison``).

Every file of ``bad_inputs.CASES`` goes through both entry points: loadable files must give a result of
the expected size, rejected files a clear error. Then bad chains and bad models go through the command
line, and the cases that ``test_app.py`` does not already cover go through the handler.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from bad_inputs import CASES, CASES_BY_NAME
from conftest import make_tiny_vae
from demo import handlers, runs
from reed.cli import main
from reed.edits import OPERATIONS, Operation
from reed.edits.registry import Param
from reed.images import MAX_WORKING_SIDE, load_image, resize_to_working_size
from reed.models import WEIGHTS_NAME

# Shorter side forced on the loadable cases, small so that the tiny VAEs run in milliseconds.
WORKING_SIZE = 32
# (height, width) of each loadable case at WORKING_SIZE: the shorter side becomes 32 and the longer side
# is scaled to match, then centre-cropped down to a multiple of 8.
WORKING_SHAPES = {
    "rgba": (32, 40),
    "la": (32, 40),
    "grayscale": (32, 168),
    "palette": (32, 40),
    "palette_transparent": (32, 40),
    "16bit": (32, 256),
    "cmyk_jpeg": (32, 48),
    "exif_rotate_clockwise": (48, 32),
    "exif_rotate_counter_clockwise": (48, 32),
    "animated_gif": (32, 40),
    "large_photo": (32, 48),
}
# Cases run at their own size, which is not a multiple of 8, so the VAE pads them and crops back.
# The 1021x1021 case runs only with the slow tests: it takes about four times as long as 817x613.
ODD_SIZE_CASES = [pytest.param("square_1021", marks=pytest.mark.slow), "wide_817x613"]
ODD_SIZE_NAMES = ["square_1021", "wide_817x613"]
REJECTED_CASES = [case.name for case in CASES if case.expected.rejected]
# The command line caps the longer side at MAX_WORKING_SIDE instead of the loader's default cap, so the
# large photo's note names another size than the one in CASES.
CLI_NOTES = {"large_photo": (f"Resized from 6000x4000 to {MAX_WORKING_SIDE}x683",)}


def make_factor8_vae(seed: int) -> AutoencoderKL:
    """Build a tiny VAE with a downsampling factor of 8 and no attention in its middle block.

    The conftest VAEs attend over every latent position of a factor-2 latent, which takes minutes at
    1021x1021. This one runs such a size in about a second and pads to a multiple of 8, as real VAEs do.
    """
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=32, mid_block_add_attention=False,
    ).eval()


@pytest.fixture(scope="module")
def factor8_vae_dirs(tmp_path_factory) -> tuple[str, str]:
    folders = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"factor8-vae-{seed}")
        make_factor8_vae(seed).save_pretrained(folder, safe_serialization=True)
        folders.append(str(folder))
    return folders[0], folders[1]


@pytest.fixture(scope="module")
def four_channel_vae_dir(tmp_path_factory) -> str:
    """A VAE that loads but cannot run on RGB images, because its encoder expects 4 input channels."""
    folder = tmp_path_factory.mktemp("four-channel-vae")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=4, out_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture
def isolated_runs(tmp_path, monkeypatch):
    """Write the handler's run folders under this test's tmp_path, not the shared temp directory."""
    root = tmp_path / "runs"
    monkeypatch.setattr(runs, "RUNS_ROOT", root)
    monkeypatch.setattr(handlers, "new_run_folder", lambda: runs.new_run_folder(root))
    return root


@pytest.fixture
def photo_file(tmp_path, photo) -> str:
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    return str(path)


def _shape(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_every_case_has_a_test():
    loadable = {case.name for case in CASES if not case.expected.rejected}
    assert set(WORKING_SHAPES) | set(ODD_SIZE_NAMES) == loadable


# Image files through the command line


@pytest.fixture(scope="module")
def cli_run_of_loadable_cases(case_path, tiny_vae_dir, tmp_path_factory):
    """Run one ``chain`` command over every loadable case at WORKING_SIZE, and return (code, out folder, stdout)."""
    out = tmp_path_factory.mktemp("cli-loadable") / "out"
    paths = [str(case_path(name)) for name in WORKING_SHAPES]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["chain", *paths, "--chain", "roundtrip", "--models", tiny_vae_dir, "--size", str(WORKING_SIZE),
                     "--out", str(out)])
    return code, out, stdout.getvalue()


def test_cli_loadable_cases_succeed(cli_run_of_loadable_cases):
    code, out, _ = cli_run_of_loadable_cases
    rows = json.loads((out / "metrics.json").read_text())

    assert code == 0
    assert len(rows) == len(WORKING_SHAPES)


@pytest.mark.parametrize("name", list(WORKING_SHAPES))
def test_cli_case_keeps_working_shape(name, cli_run_of_loadable_cases, case_path):
    _, out, _ = cli_run_of_loadable_cases
    images = sorted((out / "images" / case_path(name).stem).rglob("step-*.png"))

    assert len(images) == 1
    assert _shape(images[0]) == WORKING_SHAPES[name]


@pytest.mark.parametrize("name", list(WORKING_SHAPES))
def test_cli_case_prints_its_notes(name, cli_run_of_loadable_cases, case_path):
    _, _, stdout = cli_run_of_loadable_cases
    prefix = f"{case_path(name).stem}: "
    printed = [line for line in stdout.splitlines() if line.startswith(prefix)]
    expected = CLI_NOTES.get(name, CASES_BY_NAME[name].expected.notes)

    for fragment in expected:
        assert any(fragment in line for line in printed), f"{fragment!r} not in {printed}"
    assert len(printed) == len(expected)


@pytest.mark.parametrize("name", ODD_SIZE_CASES)
def test_cli_odd_size_kept(name, case_path, factor8_vae_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    path = case_path(name)

    code = main(["chain", str(path), "--chain", "roundtrip", "--models", factor8_vae_dirs[0], "--out", str(out)])

    images = sorted((out / "images" / path.stem).rglob("step-*.png"))
    assert code == 0
    assert len(images) == 1
    assert _shape(images[0]) == _read(path).shape[:2]
    assert "Resized" not in capsys.readouterr().out


@pytest.mark.parametrize("name", REJECTED_CASES)
def test_cli_rejects_bad_file(name, case_path, tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "out"

    code = main(["chain", str(case_path(name)), "--chain", "roundtrip", "--models", tiny_vae_dir, "--out", str(out)])

    assert code == 2
    assert CASES_BY_NAME[name].expected.error in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


# Image files through the app's handler


@pytest.mark.parametrize("name", list(WORKING_SHAPES))
def test_app_case_keeps_working_shape(name, case_path, tiny_vae_dir, other_tiny_vae_dir, isolated_runs):
    path = case_path(name)

    result = handlers.run_comparison(str(path), "roundtrip", tiny_vae_dir, other_tiny_vae_dir, WORKING_SIZE, 0)

    record = result.record
    assert _shape(record.source_path) == WORKING_SHAPES[name]
    for model in record.models:
        assert _shape(record.step_paths[model][0]) == WORKING_SHAPES[name]
    # The source the models saw is the loader's output at the working size, so each loading rule applied.
    expected_source = resize_to_working_size(load_image(path).pixels, WORKING_SIZE)
    np.testing.assert_array_equal(_read(record.source_path), expected_source)
    for fragment in CASES_BY_NAME[name].expected.notes:
        assert any(fragment in note for note in result.notes), f"{fragment!r} not in {result.notes}"


@pytest.mark.parametrize("name", ODD_SIZE_CASES)
def test_app_odd_size_kept(name, case_path, factor8_vae_dirs, isolated_runs):
    path = case_path(name)
    stored = _read(path)
    height, width = stored.shape[:2]

    result = handlers.run_comparison(str(path), "roundtrip", *factor8_vae_dirs, "original", 0)

    record = result.record
    np.testing.assert_array_equal(_read(record.source_path), stored)
    for model in record.models:
        assert _shape(record.step_paths[model][0]) == (height, width)
    assert f"Working at the photo's own size, {width}x{height} pixels." in result.notes


# Chains through the command line


@pytest.mark.parametrize("chain_text, fragment", [
    ("rotate degrees", "expected key=value"),
    ("rotate degrees=", "expected key=value"),
    ("jpeg quality=0", "must be between 1 and 100"),
    ("rotate degrees=999", "Out of range"),
    ("roundtrip*1000000000000", "Chain too long"),
    ('{"steps": [{"op": "roundtrip", "repeat": 1000000000}]}', "Chain too long"),
    ('{"steps": [', "Invalid chain JSON"),
    ('[{"op": "roundtrip", "repeat": "3"}]', "integer"),
    ("", "empty"),
])
def test_cli_rejects_bad_chain(chain_text, fragment, photo_file, tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "out"

    code = main(["chain", photo_file, "--chain", chain_text, "--models", tiny_vae_dir, "--out", str(out)])

    assert code == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def stamp_operation(monkeypatch) -> str:
    """Register an operation with a required parameter, as the diffusion edits have, and return its name."""
    def stamp(image, context, text):
        return image

    required = Param("text", str, None, "the text to stamp", required=True)
    monkeypatch.setitem(OPERATIONS, "stamp", Operation("stamp", stamp, (required,), "stamp a text"))
    return "stamp"


def test_cli_rejects_missing_parameter(stamp_operation, photo_file, tiny_vae_dir, tmp_path, capsys):
    code = main(["chain", photo_file, "--chain", f"roundtrip | {stamp_operation}", "--models", tiny_vae_dir,
                 "--out", str(tmp_path / "out")])

    assert code == 2
    assert "Missing parameter 'text' for operation 'stamp'" in capsys.readouterr().err


def test_app_rejects_missing_parameter(stamp_operation, photo_file, tiny_vae_dir, other_tiny_vae_dir):
    with pytest.raises(gr.Error) as error:
        handlers.run_comparison(photo_file, stamp_operation, tiny_vae_dir, other_tiny_vae_dir, WORKING_SIZE, 0)

    assert "Missing parameter 'text' for operation 'stamp'" in error.value.message


def test_cli_rejects_missing_chain_file(photo_file, tiny_vae_dir, tmp_path, capsys):
    missing = tmp_path / "missing-chain.json"

    code = main(["chain", photo_file, "--chain", str(missing), "--models", tiny_vae_dir, "--out", str(tmp_path / "out")])

    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_rejects_malformed_chain_file(photo_file, tiny_vae_dir, tmp_path, capsys):
    chain_file = tmp_path / "chain.json"
    chain_file.write_text('{"steps": [{"op": "roundtrip",', encoding="utf-8")

    code = main(["chain", photo_file, "--chain", str(chain_file), "--models", tiny_vae_dir, "--out", str(tmp_path / "out")])

    assert code == 2
    assert "Invalid chain JSON" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["12", "0", "-8"])
def test_cli_rejects_bad_working_size(size, photo_file, tiny_vae_dir, tmp_path, capsys):
    code = main(["chain", photo_file, "--chain", "roundtrip", "--models", tiny_vae_dir, "--size", size,
                 "--out", str(tmp_path / "out")])

    assert code == 2
    assert "size must be a positive multiple of 8" in capsys.readouterr().err


def test_cli_rejects_absurd_cycle_count(photo_file, tiny_vae_dir, tmp_path, capsys):
    code = main(["ladder", photo_file, "--models", tiny_vae_dir, "--cycles", "100000", "--out", str(tmp_path / "out")])

    assert code == 2
    assert "--cycles must be between 1 and 500" in capsys.readouterr().err


# Models through both entry points


@pytest.fixture
def pickle_only_dir(tmp_path) -> str:
    folder = tmp_path / "pickle-vae"
    make_tiny_vae().save_pretrained(folder, safe_serialization=False)
    return str(folder)


@pytest.fixture
def weightless_dir(tmp_path) -> str:
    folder = tmp_path / "weightless-vae"
    make_tiny_vae().save_pretrained(folder, safe_serialization=True)
    (folder / WEIGHTS_NAME).unlink()
    return str(folder)


@pytest.fixture
def truncated_weights_dir(tmp_path) -> str:
    """A VAE folder whose weights file stops halfway, as after an interrupted download."""
    folder = tmp_path / "truncated-vae"
    make_tiny_vae().save_pretrained(folder, safe_serialization=True)
    weights = folder / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return str(folder)


# The fixture that provides each bad model reference, and a fragment of the error it must give.
BAD_MODELS = [
    ("offline_hub_id", "HF_HUB_OFFLINE is set"),
    ("weightless_dir", "no weights"),
    ("pickle_only_dir", "only pickle checkpoints"),
    ("truncated_weights_dir", "Unable to load weights"),
]
OFFLINE_HUB_ID = "reed-tests/no-such-vae"


@pytest.fixture
def offline_hub_id(monkeypatch) -> str:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return OFFLINE_HUB_ID


@pytest.mark.parametrize("fixture_name, fragment", BAD_MODELS)
def test_cli_rejects_bad_model(fixture_name, fragment, request, photo_file, tiny_vae_dir, tmp_path, capsys):
    reference = request.getfixturevalue(fixture_name)
    out = tmp_path / "out"

    code = main(["chain", photo_file, "--chain", "roundtrip", "--models", f"{tiny_vae_dir},{reference}",
                 "--out", str(out)])

    error = capsys.readouterr().err
    assert code == 2
    assert fragment in error
    assert reference in error
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("fixture_name, fragment", BAD_MODELS)
def test_app_rejects_bad_model(fixture_name, fragment, request, photo_file, tiny_vae_dir, isolated_runs):
    reference = request.getfixturevalue(fixture_name)

    with pytest.raises(gr.Error) as error:
        handlers.run_comparison(photo_file, "roundtrip", tiny_vae_dir, reference, WORKING_SIZE, 0)

    assert fragment in error.value.message
    assert not isolated_runs.exists()


def test_cli_runs_different_latent_shapes(photo_file, tiny_vae_dir, other_tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "out"

    code = main(["chain", photo_file, "--chain", "roundtrip*2", "--models", f"{tiny_vae_dir},{other_tiny_vae_dir}",
                 "--out", str(out)])

    rows = json.loads((out / "metrics.json").read_text())
    assert code == 0
    assert {row["model"] for row in rows} == {tiny_vae_dir, other_tiny_vae_dir}
    assert "different latent shapes" in capsys.readouterr().out


def test_cli_reports_model_that_fails(photo_file, tiny_vae_dir, four_channel_vae_dir, tmp_path, capsys):
    code = main(["chain", photo_file, "--chain", "roundtrip", "--models", f"{tiny_vae_dir},{four_channel_vae_dir}",
                 "--out", str(tmp_path / "out")])

    # The message is torch's, which names the channel counts of the layer and of the image.
    assert code == 2
    assert "channels" in capsys.readouterr().err


# An exception inside one app run


def test_app_failing_model_then_next_run(photo_file, tiny_vae_dir, other_tiny_vae_dir, four_channel_vae_dir,
                                         isolated_runs):
    with pytest.raises(gr.Error) as error:
        handlers.run_comparison(photo_file, "roundtrip", tiny_vae_dir, four_channel_vae_dir, WORKING_SIZE, 0)
    assert error.value.message.startswith("Running the chain failed (RuntimeError: ")

    result = handlers.run_comparison(photo_file, "roundtrip*2", tiny_vae_dir, other_tiny_vae_dir, WORKING_SIZE, 0)
    assert result.record.step_count == 2


def test_app_memory_error_then_next_run(photo_file, tiny_vae_dir, other_tiny_vae_dir, isolated_runs, monkeypatch):
    def exhaust_memory(image, context):
        raise MemoryError("cannot allocate 64 GiB")

    monkeypatch.setitem(OPERATIONS, "exhaust", Operation("exhaust", exhaust_memory, (), "always runs out of memory"))
    with pytest.raises(gr.Error) as error:
        handlers.run_comparison(photo_file, "roundtrip | exhaust", tiny_vae_dir, other_tiny_vae_dir, WORKING_SIZE, 0)
    assert error.value.message.startswith("Running the chain failed (MemoryError: cannot allocate 64 GiB)")

    result = handlers.run_comparison(photo_file, "roundtrip", tiny_vae_dir, other_tiny_vae_dir, WORKING_SIZE, 0)
    assert result.record.step_count == 1


@pytest.mark.parametrize("chain_text, fragment", [
    ('{"steps": [', "Invalid chain JSON"),
    ("roundtrip*1000000000000", "Chain too long"),
    ('{"steps": [{"op": "roundtrip", "repeat": 1000000000}]}', "Chain too long"),
    ("jpeg quality=0", "must be between 1 and 100"),
])
def test_app_rejects_bad_chain(chain_text, fragment, photo_file, tiny_vae_dir, other_tiny_vae_dir):
    with pytest.raises(gr.Error) as error:
        handlers.run_comparison(photo_file, chain_text, tiny_vae_dir, other_tiny_vae_dir, WORKING_SIZE, 0)

    assert fragment in error.value.message
