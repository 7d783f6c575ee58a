"""Tests of the Gradio app: its handlers on tiny random VAEs, and the real app driven through gradio_client.

The end-to-end test starts ``app.py`` on 127.0.0.1 and compares the built-in models ``reed-mini:standard``
and ``reed-mini:reed``. While their weights are missing it is skipped. To run it anyway, set
``REED_APP_TEST_MODELS=tiny`` (two tiny random VAEs made by the test) or
``REED_APP_TEST_MODELS=REF_A,REF_B`` (any two model references, such as local folders).
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from app_server import running_app
from bad_inputs import CASES, write_case
from demo import handlers, runs, ui
from reed.chain import load_chain
from reed.data import held_out_paths
from reed.edits import OPERATIONS, Operation
from reed.models import BUILTIN_MODELS, DEFAULT_ARMS, WEIGHTS_NAME

REPO_ROOT = Path(__file__).resolve().parents[1]
# Small enough that a 25-step chain on two models takes seconds, large enough for 8x8 latents at factor 8.
E2E_WORKING_SIZE = "128"
HANDLER_WORKING_SIZE = 64
MODELS_VARIABLE = "REED_APP_TEST_MODELS"


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Run torch on one thread in this module, restoring the setting afterwards.

    The handlers run many small convolutions, which gain little from a second thread, and a thread
    pool whose cores are busy with other work can stall for far longer than the work itself.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch):
    """Write each test's run folders and example copies under its tmp_path, not the shared temp directory."""
    root = tmp_path / "runs"
    monkeypatch.setattr(runs, "RUNS_ROOT", root)
    monkeypatch.setattr(handlers, "EXAMPLES_FOLDER", tmp_path / "examples")
    monkeypatch.setattr(handlers, "new_run_folder", lambda: runs.new_run_folder(root))
    return root


@pytest.fixture(scope="module")
def photo_path() -> str:
    return str(held_out_paths()["astronaut"])


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# Handlers


def test_run_outputs_every_step_for_both_models(photo_path, tiny_vae_dir, other_tiny_vae_dir):
    calls = []
    chain_text = "roundtrip*3 | rotate degrees=3 | roundtrip*2"
    result = handlers.run_comparison(photo_path, chain_text, tiny_vae_dir, other_tiny_vae_dir,
                                     HANDLER_WORKING_SIZE, 0, progress=lambda value, desc=None: calls.append(value))
    record = result.record
    step_count = 6

    assert record.step_count == step_count
    assert record.models == (tiny_vae_dir, other_tiny_vae_dir)
    for model in record.models:
        assert len(record.step_paths[model]) == step_count
        for path in record.step_paths[model]:
            assert _read(path).shape == (HANDLER_WORKING_SIZE, HANDLER_WORKING_SIZE, 3)
    assert record.step_texts[3] == "rotate degrees=3.0"
    assert calls[-1] == (2 * step_count, 2 * step_count)


def test_run_table_rows_per_model_step(photo_path, tiny_vae_dir, other_tiny_vae_dir):
    result = handlers.run_comparison(photo_path, "roundtrip*4", tiny_vae_dir, other_tiny_vae_dir,
                                     HANDLER_WORKING_SIZE, 0)
    model_column = result.table_headers.index("model")
    step_column = result.table_headers.index("step")
    pairs = [(row[model_column], row[step_column]) for row in result.table_rows]

    assert len(pairs) == 8
    assert sorted(pairs) == sorted((model, step) for model in (tiny_vae_dir, other_tiny_vae_dir)
                                   for step in range(1, 5))
    with open(result.record.folder / "metrics.csv", newline="", encoding="utf-8") as file:
        assert len(list(csv.DictReader(file))) == 8


def test_run_writes_files_into_fresh_folder(photo_path, tiny_vae_dir, other_tiny_vae_dir, isolated_runs):
    first = handlers.run_comparison(photo_path, "roundtrip*2", tiny_vae_dir, other_tiny_vae_dir,
                                    HANDLER_WORKING_SIZE, 0)
    second = handlers.run_comparison(photo_path, "roundtrip*2", tiny_vae_dir, other_tiny_vae_dir,
                                     HANDLER_WORKING_SIZE, 0)

    assert first.record.folder != second.record.folder
    assert first.record.folder.parent == isolated_runs
    names = [path.name for path in first.files]
    assert names == ["metrics.csv", "metrics.json", "grid.png", "curves.png", handlers.RESULTS_ZIP]
    for path in first.files:
        assert path.is_file()
        assert path.parent == first.record.folder


def test_run_returns_views_plot_grid_and_notes(photo_path, tiny_vae_dir, other_tiny_vae_dir):
    result = handlers.run_comparison(photo_path, "roundtrip*2", tiny_vae_dir, other_tiny_vae_dir,
                                     HANDLER_WORKING_SIZE, 0)
    view = result.view

    assert view.step == 2
    assert set(view.images) == {tiny_vae_dir, other_tiny_vae_dir}
    assert set(view.differences) == {tiny_vae_dir, other_tiny_vae_dir}
    assert view.source.shape == (HANDLER_WORKING_SIZE, HANDLER_WORKING_SIZE, 3)
    assert len(result.figure.axes) == 2
    assert result.grid.ndim == 3
    # The second tiny VAE has 8 latent channels and the first 4, so the library adds a note.
    assert any("different latent shapes" in note for note in result.notes)
    assert any("Resized from 512x512 to 64x64" in note for note in result.notes)


def test_show_step_selects_the_step(photo_path, tiny_vae_dir, other_tiny_vae_dir):
    record = handlers.run_comparison(photo_path, "roundtrip*3", tiny_vae_dir, other_tiny_vae_dir,
                                     HANDLER_WORKING_SIZE, 0).record
    view = handlers.show_step(record, 2, 4.0)

    assert view.step == 2
    assert view.caption.startswith("**Step 2 of 3**")
    for model in record.models:
        np.testing.assert_array_equal(view.images[model], _read(record.step_paths[model][1]))
    assert "| model |" in view.metrics_markdown


@pytest.mark.parametrize("step", [0, 4, 1.5])
def test_show_step_rejects_invalid_step(photo_path, tiny_vae_dir, other_tiny_vae_dir, step):
    record = handlers.run_comparison(photo_path, "roundtrip*3", tiny_vae_dir, other_tiny_vae_dir,
                                     HANDLER_WORKING_SIZE, 0).record
    with pytest.raises(gr.Error, match="Invalid step"):
        handlers.show_step(record, step, 4.0)


def test_show_step_reports_expired_result(photo_path, tiny_vae_dir, other_tiny_vae_dir):
    record = handlers.run_comparison(photo_path, "roundtrip*2", tiny_vae_dir, other_tiny_vae_dir,
                                     HANDLER_WORKING_SIZE, 0).record
    runs.remove_old_runs(record.folder.parent, max_age_s=-1)

    with pytest.raises(gr.Error, match="removed"):
        handlers.show_step(record, 1, 4.0)


@pytest.mark.parametrize("case", [case.name for case in CASES if case.expected.rejected])
def test_unreadable_upload_raises_gr_error(case, tmp_path, tiny_vae_dir, other_tiny_vae_dir):
    path = write_case(case, tmp_path)

    with pytest.raises(gr.Error) as preview_error:
        handlers.preview_image(str(path), "256")
    with pytest.raises(gr.Error) as run_error:
        handlers.run_comparison(str(path), "roundtrip*2", tiny_vae_dir, other_tiny_vae_dir,
                                HANDLER_WORKING_SIZE, 0)
    expected = next(c for c in CASES if c.name == case).expected.error
    assert expected in preview_error.value.message
    assert expected in run_error.value.message


@pytest.mark.parametrize("chain_text, fragment", [
    ("", "empty"),
    ("   ", "empty"),
    ("roundtrip*0", "Invalid repeat count"),
    ("blurr radius=2", "Unknown operation 'blurr'"),
    ("rotate degrees=999", "Out of range"),
    ("rotate degrees", "expected key=value"),
    ('{"steps": [{"op": 3}]}', "Invalid chain JSON"),
    (f"roundtrip*{handlers.MAX_APP_STEPS + 1}", "at most"),
])
def test_bad_chain_raises_gr_error(photo_path, tiny_vae_dir, other_tiny_vae_dir, chain_text, fragment):
    with pytest.raises(gr.Error) as error:
        handlers.run_comparison(photo_path, chain_text, tiny_vae_dir, other_tiny_vae_dir, HANDLER_WORKING_SIZE, 0)
    assert fragment in error.value.message


def test_missing_model_folder_raises_gr_error(photo_path, tiny_vae_dir, tmp_path):
    missing = str(tmp_path / "no-such-vae")
    with pytest.raises(gr.Error) as error:
        handlers.run_comparison(photo_path, "roundtrip", tiny_vae_dir, missing, HANDLER_WORKING_SIZE, 0)
    assert "not found" in error.value.message
    assert missing in error.value.message


def test_folder_without_weights_raises_gr_error(photo_path, tiny_vae_dir, tmp_path):
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(gr.Error) as error:
        handlers.run_comparison(photo_path, "roundtrip", tiny_vae_dir, str(tmp_path), HANDLER_WORKING_SIZE, 0)
    assert WEIGHTS_NAME in error.value.message


@pytest.mark.parametrize("model_a, model_b, fragment", [
    ("", "reed-mini:reed", "Choose the first model"),
    ("reed-mini:standard", None, "Choose the second model"),
    ("reed-mini:reed", " reed-mini:reed ", "Choose two different models"),
])
def test_model_choice_errors(photo_path, model_a, model_b, fragment):
    with pytest.raises(gr.Error, match=fragment):
        handlers.run_comparison(photo_path, "roundtrip", model_a, model_b, HANDLER_WORKING_SIZE, 0)


@pytest.mark.parametrize("seed", [-1, 0.5, "abc", handlers.MAX_SEED + 1])
def test_invalid_seed_raises_gr_error(photo_path, tiny_vae_dir, other_tiny_vae_dir, seed):
    with pytest.raises(gr.Error, match="Invalid seed"):
        handlers.run_comparison(photo_path, "roundtrip", tiny_vae_dir, other_tiny_vae_dir, HANDLER_WORKING_SIZE, seed)


def test_missing_photo_raises_gr_error(tiny_vae_dir, other_tiny_vae_dir):
    with pytest.raises(gr.Error, match="Upload a photo"):
        handlers.run_comparison(None, "roundtrip", tiny_vae_dir, other_tiny_vae_dir, HANDLER_WORKING_SIZE, 0)


def test_failing_edit_raises_gr_error(photo_path, tiny_vae_dir, other_tiny_vae_dir, monkeypatch):
    def reject_image(image, context):
        raise ValueError("this image is too dark to edit")

    monkeypatch.setitem(OPERATIONS, "reject", Operation("reject", reject_image, (), "always fails"))
    with pytest.raises(gr.Error) as error:
        handlers.run_comparison(photo_path, "roundtrip | reject", tiny_vae_dir, other_tiny_vae_dir,
                                HANDLER_WORKING_SIZE, 0)
    assert error.value.message == "An edit in the chain failed: this image is too dark to edit"


def test_invalid_colour_raises_gr_error(photo_path, tiny_vae_dir, other_tiny_vae_dir):
    with pytest.raises(gr.Error) as error:
        handlers.run_comparison(photo_path, "rotate fill=nocolour", tiny_vae_dir, other_tiny_vae_dir,
                                HANDLER_WORKING_SIZE, 0)
    assert "Invalid color 'nocolour'" in error.value.message


@pytest.mark.parametrize("choice, expected", [("128", 128), ("256", 256), (512, 512), ("original", None),
                                              (None, 256), ("64", 64)])
def test_parse_working_size(choice, expected):
    assert handlers.parse_working_size(choice) == expected


@pytest.mark.parametrize("choice", ["huge", "100", "8", "2048"])
def test_parse_working_size_rejects_invalid(choice):
    with pytest.raises(gr.Error, match="Invalid working size"):
        handlers.parse_working_size(choice)


def test_prepare_image_resizes_and_notes(photo_path):
    prepared = handlers.prepare_image(photo_path, "128")

    assert prepared.pixels.shape == (128, 128, 3)
    assert prepared.name == "astronaut"
    assert prepared.notes == ["Resized from 512x512 to 128x128 pixels: the shorter side is 128, and the "
                              "longer side is centre-cropped to a multiple of 8."]


def test_prepare_image_original_caps_large_photo(tmp_path):
    path = write_case("large_photo", tmp_path)
    prepared = handlers.prepare_image(str(path), "original")

    assert max(prepared.pixels.shape[:2]) == handlers.ORIGINAL_MAX_SIDE
    assert any("Resized from 6000x4000" in note for note in prepared.notes)


def test_preview_without_photo_is_empty():
    assert handlers.preview_image(None, "256") == (None, "")


def test_example_photos_are_held_out_copies():
    photos = handlers.example_photos()

    assert list(photos) == list(held_out_paths())
    for name, path in photos.items():
        assert path.parent == handlers.EXAMPLES_FOLDER
        assert path.read_bytes() == held_out_paths()[name].read_bytes()
    assert handlers.example_photo(1) == str(photos["chelsea"])


# Chain builder


def test_add_step_appends_non_default_values():
    text = handlers.add_step("roundtrip*5", "rotate", 2, ["3", ""])

    assert text == "roundtrip*5 | rotate*2 degrees=3.0"
    assert len(load_chain(text)) == 7


def test_add_step_to_empty_chain_uses_defaults():
    assert handlers.add_step("", "jpeg", 1, ["85"]) == "jpeg"
    assert handlers.add_step(None, "flip", 1, ["vertical"]) == "flip direction=vertical"


def test_add_step_keeps_line_layout():
    assert handlers.add_step("roundtrip*2\nblur", "roundtrip", 3, []) == "roundtrip*2\nblur\nroundtrip*3"


def test_add_step_quotes_text_values():
    text = handlers.add_step("", "text", 1, ["hello world", "", "", "", ""])

    assert text == 'text text="hello world"'
    assert load_chain(text)[0].params["text"] == "hello world"


@pytest.mark.parametrize("op_name, repeat, values, fragment", [
    ("rotate", 1, ["999"], "Out of range"),
    ("flip", 1, ["diagonal"], "choose one of"),
    ("nosuchop", 1, [], "Unknown operation"),
    ("roundtrip", 0, [], "Invalid repeat"),
    ("roundtrip", handlers.MAX_APP_STEPS + 1, [], "Invalid repeat"),
])
def test_add_step_rejects_invalid_input(op_name, repeat, values, fragment):
    with pytest.raises(gr.Error, match=fragment):
        handlers.add_step("", op_name, repeat, values)


def test_parameter_fields_cover_every_operation():
    for name, operation in OPERATIONS.items():
        fields = handlers.parameter_fields(name)
        assert [field.name for field in fields] == [param.name for param in operation.params]
        assert len(fields) <= ui.PARAM_SLOTS
    assert handlers.parameter_fields("rotate")[0].info == "angle, counter-clockwise (-360 to 360)"
    assert handlers.operation_names()[0] == "roundtrip"


@pytest.mark.parametrize("name", list(handlers.PRESETS))
def test_presets_are_valid_chains(name):
    steps = load_chain(handlers.preset_chain(name))

    assert 1 <= len(steps) <= handlers.MAX_APP_STEPS
    assert steps[0].op == "roundtrip"


def test_mixed_preset_mixes_edits_and_round_trips():
    ops = [step.op for step in load_chain(handlers.PRESETS["Mixed session"])]

    assert {"rotate", "jpeg", "brightness", "crop"} <= set(ops)
    assert ops.count("roundtrip") == 24


# Run folders


def _make_run(root: Path, name: str, age_s: float) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    stamp = time.time() - age_s
    os.utime(folder, (stamp, stamp))
    return folder


def test_remove_old_runs_deletes_expired_folders(tmp_path):
    old = _make_run(tmp_path, "run-old", runs.MAX_RUN_AGE_S + 60)
    new = _make_run(tmp_path, "run-new", 10)
    other = _make_run(tmp_path, "not-a-run", runs.MAX_RUN_AGE_S + 60)

    assert runs.remove_old_runs(tmp_path) == [old]
    assert new.is_dir()
    assert other.is_dir()


def test_remove_old_runs_keeps_newest(tmp_path):
    folders = [_make_run(tmp_path, f"run-{index}", age_s=index) for index in range(5)]

    removed = runs.remove_old_runs(tmp_path, keep=3)

    assert removed == folders[3:]
    assert [folder.is_dir() for folder in folders] == [True, True, True, False, False]


# UI


def test_build_demo_sets_queue_limits():
    demo = ui.build_demo()

    assert demo._queue.max_size == ui.QUEUE_MAX_SIZE
    assert demo._queue.default_concurrency_limit == ui.RUN_CONCURRENCY
    api_names = {function.api_name for function in demo.fns.values()}
    assert {"run", "show_step", "preview", "add_step"} <= api_names


# End to end


def _output_value(output):
    """Return the value of an output that a handler returned as a component update (a dict)."""
    if isinstance(output, dict) and output.get("__type__") == "update":
        return output["value"]
    return output


def _builtins_present() -> bool:
    return all((BUILTIN_MODELS[name] / WEIGHTS_NAME).is_file() for name in DEFAULT_ARMS)


@pytest.fixture(scope="module")
def e2e_models(tmp_path_factory) -> tuple[str, str]:
    """Pick the two model references of the end-to-end test (see the module docstring)."""
    choice = os.environ.get(MODELS_VARIABLE, "").strip()
    if choice == "tiny":
        from conftest import make_tiny_vae

        folders = []
        for seed in (0, 1):
            folder = tmp_path_factory.mktemp(f"e2e-vae-{seed}")
            make_tiny_vae(seed=seed).save_pretrained(folder, safe_serialization=True)
            folders.append(str(folder))
        return folders[0], folders[1]
    if choice:
        references = [part.strip() for part in choice.split(",")]
        if len(references) != 2 or not all(references):
            pytest.fail(f"{MODELS_VARIABLE}={choice!r}: expected 'tiny' or two references separated by a comma.")
        return references[0], references[1]
    if not _builtins_present():
        pytest.skip(f"The built-in weights of {', '.join(DEFAULT_ARMS)} are missing; set {MODELS_VARIABLE}=tiny "
                    "to run this test on tiny random VAEs.")
    return DEFAULT_ARMS[0], DEFAULT_ARMS[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The URL of the running app (``python app.py`` on a free port of 127.0.0.1)."""
    with running_app(tmp_path_factory.mktemp("app-server")) as server:
        yield server.url


def test_app_end_to_end_25_round_trips(app_url, e2e_models, photo_path, monkeypatch, tmp_path):
    from gradio_client import Client, handle_file

    # gradio_client 2.7 starts a telemetry thread even with analytics_enabled=False unless this
    # variable is set to something other than "True".
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    # gradio_client 2.7 downloads each output through a folder in the system temp directory and leaves
    # the empty folder behind, so point the temp directory into this test's tmp_path.
    client_temp = tmp_path / "client-temp"
    client_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(client_temp))
    client = Client(app_url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))
    model_a, model_b = e2e_models

    outputs = client.predict(handle_file(photo_path), "roundtrip*25", model_a, model_b, E2E_WORKING_SIZE, 0,
                             api_name="/run")
    (notes, _slider, caption, source, image_a, image_b, _before_after_a, _before_after_b, difference_a,
     difference_b, step_metrics, _plot, grid, table, files) = [_output_value(output) for output in outputs]

    assert caption.startswith("**Step 25 of 25**")
    size = int(E2E_WORKING_SIZE)
    for image in (source, image_a, image_b):
        assert _read(image).shape == (size, size, 3)
    assert not np.array_equal(_read(image_a), _read(image_b))
    assert _read(difference_a).ndim == 3
    assert _read(difference_b).ndim == 3
    assert _read(grid).ndim == 3
    assert model_a in step_metrics or model_a[-30:] in step_metrics
    assert "Ran 25 steps with 2 models at 128x128 pixels" in notes

    headers, rows = table["headers"], table["data"]
    assert len(rows) == 50
    by_model = {}
    for row in rows:
        record = dict(zip(headers, row))
        by_model.setdefault(record["model"], []).append(record)
    assert set(by_model) == {model_a, model_b}
    for model, records in by_model.items():
        assert sorted(record["step"] for record in records) == list(range(1, 26))
        for record in records:
            assert math.isfinite(record["PSNR vs source (dB)"])
            assert 0 < record["SSIM vs source"] <= 1

    csv_path = next(Path(path) for path in files if Path(path).name == "metrics.csv")
    with open(csv_path, newline="", encoding="utf-8") as file:
        csv_rows = list(csv.DictReader(file))
    assert len(csv_rows) == 50
    assert {row["model"] for row in csv_rows} == {model_a, model_b}

    # The step slider's handler reads the run kept in this client's session.
    step_outputs = [_output_value(output) for output in client.predict(10, 4, api_name="/show_step")]
    assert step_outputs[0].startswith("**Step 10 of 25**")
    assert not np.array_equal(_read(step_outputs[2]), _read(image_a))
