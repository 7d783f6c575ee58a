"""Tests for reed.report on tiny synthetic images and hand-made metrics rows."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reed.report import (
    GRID_GAP,
    METRIC_KEYS,
    TABLE_COLUMNS,
    default_grid_steps,
    difference_map,
    image_grid,
    plot_curves,
    rows_to_table,
    safe_name,
    save_figure,
    save_images,
    side_by_side,
    write_metrics,
)

MODEL_A = "reed-mini:standard"
MODEL_B = "reed-mini:reed"
IMAGES = ["cat.png", "dog.png", "owl.png"]
OPS = ["roundtrip", "rotate", "roundtrip"]

# (model, image) -> per step 1..3: (psnr_src, psnr_x1, ssim_src, ssim_x1).
# At step 1 the x1 values compare x1 with itself: PSNR 100 (the cap), SSIM 1.
CHAINS = {
    (MODEL_A, "cat.png"): [(30.0, 100.0, 0.90, 1.0), (29.0, 40.0, 0.88, 0.97), (28.0, 35.0, 0.86, 0.95)],
    (MODEL_A, "dog.png"): [(32.0, 100.0, 0.92, 1.0), (31.0, 42.0, 0.90, 0.98), (30.0, 37.0, 0.88, 0.96)],
    (MODEL_A, "owl.png"): [(34.0, 100.0, 0.94, 1.0), (30.0, 44.0, 0.89, 0.99), (26.0, 30.0, 0.84, 0.91)],
    (MODEL_B, "cat.png"): [(31.0, 100.0, 0.91, 1.0), (30.5, 50.0, 0.90, 0.99), (30.0, 49.0, 0.89, 0.99)],
    (MODEL_B, "dog.png"): [(33.0, 100.0, 0.93, 1.0), (32.5, 52.0, 0.92, 0.99), (32.0, 51.0, 0.91, 0.98)],
    (MODEL_B, "owl.png"): [(35.0, 100.0, 0.95, 1.0), (34.0, 54.0, 0.94, 1.00), (33.0, 50.0, 0.93, 0.97)],
}


def make_row(model: str, image: str, step: int, values: tuple[float, float, float, float]) -> dict:
    psnr_src, psnr_x1, ssim_src, ssim_x1 = values
    # LPIPS is unavailable for model B, as when its weights cannot be loaded.
    if model == MODEL_B:
        lpips_src = lpips_x1 = None
    else:
        lpips_src = 0.01 * step
        lpips_x1 = 0.0 if step == 1 else lpips_src / 2
    return {
        "image": image,
        "model": model,
        "step": step,
        "op": OPS[step - 1],
        "mse_src": 10 ** (-psnr_src / 10),
        "psnr_src": psnr_src,
        "ssim_src": ssim_src,
        "lpips_src": lpips_src,
        "mse_x1": 0.0 if step == 1 else 10 ** (-psnr_x1 / 10),
        "psnr_x1": psnr_x1,
        "ssim_x1": ssim_x1,
        "lpips_x1": lpips_x1,
        "seconds": 0.25 * step,
    }


@pytest.fixture
def rows() -> list[dict]:
    return [
        make_row(model, image, step, values)
        for (model, image), chain in CHAINS.items()
        for step, values in enumerate(chain, start=1)
    ]


def random_image(generator: np.random.Generator, height: int = 16, width: int = 16) -> np.ndarray:
    return generator.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def line_by_label(axes, label: str):
    matches = [line for line in axes.get_lines() if line.get_label() == label]
    assert len(matches) == 1, f"expected one line labelled {label!r}, found {len(matches)}"
    return matches[0]


# write_metrics


def test_write_metrics_returns_both_paths(rows, tmp_path):
    json_path, csv_path = write_metrics(rows, tmp_path / "new" / "run")

    assert json_path == tmp_path / "new" / "run" / "metrics.json"
    assert csv_path == tmp_path / "new" / "run" / "metrics.csv"
    assert json_path.is_file()
    assert csv_path.is_file()


def test_write_metrics_json_round_trip(rows, tmp_path):
    json_path, _ = write_metrics(rows, tmp_path)
    loaded = json.loads(json_path.read_text(encoding="utf-8"))

    assert loaded == rows
    assert '"lpips_src": null' in json_path.read_text(encoding="utf-8")


def test_write_metrics_json_keeps_none(rows, tmp_path):
    json_path, _ = write_metrics(rows, tmp_path)
    loaded = json.loads(json_path.read_text(encoding="utf-8"))
    model_b_rows = [row for row in loaded if row["model"] == MODEL_B]

    assert all(row["lpips_src"] is None for row in model_b_rows)
    assert all(row["lpips_x1"] is None for row in model_b_rows)


def test_write_metrics_csv_header_order(rows, tmp_path):
    rows[0]["note"] = "first"
    _, csv_path = write_metrics(rows, tmp_path)
    with csv_path.open(newline="", encoding="utf-8") as file:
        header = next(csv.reader(file))

    assert header == METRIC_KEYS + ["note"]


def test_write_metrics_csv_round_trip(rows, tmp_path):
    _, csv_path = write_metrics(rows, tmp_path)
    with csv_path.open(newline="", encoding="utf-8") as file:
        loaded = list(csv.DictReader(file))

    assert len(loaded) == len(rows)
    for written, read in zip(rows, loaded):
        assert read["image"] == written["image"]
        assert read["model"] == written["model"]
        assert int(read["step"]) == written["step"]
        assert read["op"] == written["op"]
        assert float(read["mse_src"]) == written["mse_src"]
        assert float(read["psnr_x1"]) == written["psnr_x1"]
        assert float(read["seconds"]) == written["seconds"]


def test_write_metrics_csv_none_empty(rows, tmp_path):
    _, csv_path = write_metrics(rows, tmp_path)
    with csv_path.open(newline="", encoding="utf-8") as file:
        loaded = list(csv.DictReader(file))
    model_a = [row for row in loaded if row["model"] == MODEL_A]
    model_b = [row for row in loaded if row["model"] == MODEL_B]

    assert all(row["lpips_src"] == "" for row in model_b)
    assert all(row["lpips_x1"] == "" for row in model_b)
    assert float(model_a[0]["lpips_src"]) == 0.01
    assert float(model_a[0]["lpips_x1"]) == 0.0


def test_write_metrics_extra_key_blank(rows, tmp_path):
    rows[1]["note"] = "second"
    _, csv_path = write_metrics(rows, tmp_path)
    with csv_path.open(newline="", encoding="utf-8") as file:
        loaded = list(csv.DictReader(file))

    assert loaded[1]["note"] == "second"
    assert loaded[0]["note"] == ""


def test_write_metrics_rejects_nan(rows, tmp_path):
    rows[2]["psnr_src"] = math.nan

    with pytest.raises(ValueError, match="psnr_src=nan"):
        write_metrics(rows, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_write_metrics_rejects_missing_key(rows, tmp_path):
    del rows[3]["ssim_x1"]

    with pytest.raises(ValueError, match=r"row 3 is missing the keys \['ssim_x1'\]"):
        write_metrics(rows, tmp_path)


# rows_to_table


def test_rows_to_table_shape(rows):
    table = rows_to_table(rows)

    assert len(table) == len(rows)
    assert all(len(cells) == len(TABLE_COLUMNS) for cells in table)


def test_rows_to_table_rounding():
    row = make_row(MODEL_A, "cat.png", 2, (31.23456, 40.0, 0.8765432, 0.97))
    row["mse_src"] = 0.000123456789
    row["seconds"] = 1.23456
    cells = dict(zip(TABLE_COLUMNS, rows_to_table([row])[0]))

    assert cells["PSNR vs source (dB)"] == 31.23
    assert cells["SSIM vs source"] == 0.8765
    assert cells["MSE vs source"] == 0.000123457
    assert cells["time (s)"] == 1.23
    assert cells["step"] == 2
    assert cells["op"] == "rotate"


def test_rows_to_table_none_na(rows):
    model_b_row = next(row for row in rows if row["model"] == MODEL_B)
    model_a_row = next(row for row in rows if row["model"] == MODEL_A and row["step"] == 1)
    cells_b = dict(zip(TABLE_COLUMNS, rows_to_table([model_b_row])[0]))
    cells_a = dict(zip(TABLE_COLUMNS, rows_to_table([model_a_row])[0]))

    assert cells_b["LPIPS vs source"] == "n/a"
    assert cells_b["LPIPS vs x1"] == "n/a"
    assert cells_a["LPIPS vs x1"] == 0.0


# plot_curves


def test_plot_curves_two_panels(rows):
    figure = plot_curves(rows)
    psnr_axes, ssim_axes = figure.axes

    assert len(figure.axes) == 2
    assert psnr_axes.get_ylabel() == "PSNR (dB)"
    assert ssim_axes.get_ylabel().startswith("SSIM")
    assert psnr_axes.get_xlabel() == "step"


def test_plot_curves_source_means(rows):
    psnr_axes, ssim_axes = plot_curves(rows).axes
    psnr_a = line_by_label(psnr_axes, f"{MODEL_A} vs source")
    psnr_b = line_by_label(psnr_axes, f"{MODEL_B} vs source")
    ssim_a = line_by_label(ssim_axes, f"{MODEL_A} vs source")

    # Hand-computed means over cat, dog and owl.
    np.testing.assert_allclose(psnr_a.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(psnr_a.get_ydata(), [32.0, 30.0, 28.0])
    np.testing.assert_allclose(psnr_b.get_ydata(), [33.0, 32.333333, 31.666667], rtol=1e-6)
    np.testing.assert_allclose(ssim_a.get_ydata(), [0.92, 0.89, 0.86])


def test_plot_curves_x1_means(rows):
    psnr_axes, ssim_axes = plot_curves(rows).axes
    psnr_a = line_by_label(psnr_axes, f"{MODEL_A} vs x1")
    psnr_b = line_by_label(psnr_axes, f"{MODEL_B} vs x1")
    ssim_b = line_by_label(ssim_axes, f"{MODEL_B} vs x1")

    # Step 1 compares x1 with itself and is left out of the x1 lines.
    np.testing.assert_allclose(psnr_a.get_xdata(), [2, 3])
    np.testing.assert_allclose(psnr_a.get_ydata(), [42.0, 34.0])
    np.testing.assert_allclose(psnr_b.get_ydata(), [52.0, 50.0])
    np.testing.assert_allclose(ssim_b.get_ydata(), [0.993333, 0.98], rtol=1e-6)


def test_plot_curves_line_styles(rows):
    psnr_axes, _ = plot_curves(rows).axes
    versus_x1 = line_by_label(psnr_axes, f"{MODEL_A} vs x1")
    versus_source = line_by_label(psnr_axes, f"{MODEL_A} vs source")
    other_model = line_by_label(psnr_axes, f"{MODEL_B} vs x1")

    assert versus_x1.get_linestyle() == "-"
    assert versus_source.get_linestyle() == "--"
    assert versus_x1.get_color() == versus_source.get_color()
    assert other_model.get_color() != versus_x1.get_color()


def test_plot_curves_title_mentions_mean(rows):
    figure = plot_curves(rows, title="Drift")
    single = plot_curves([row for row in rows if row["image"] == "cat.png"], title="Drift")

    assert figure.get_suptitle() == "Drift (mean over 3 images)"
    assert "mean" not in single.get_suptitle()


def test_plot_curves_marks_edit_steps(rows):
    psnr_axes, ssim_axes = plot_curves(rows).axes
    marker = line_by_label(psnr_axes, "edit step (rotate)")
    ssim_markers = [line for line in ssim_axes.get_lines() if "vs" not in line.get_label()]

    np.testing.assert_allclose(marker.get_xdata(), [2, 2])
    assert len(ssim_markers) == 1


def test_plot_curves_integer_ticks(rows):
    figure = plot_curves(rows)
    figure.canvas.draw()
    ticks = figure.axes[0].get_xticks()

    assert len(ticks) > 0
    assert np.all(ticks == np.round(ticks))


def test_plot_curves_has_legend_grid(rows):
    psnr_axes, _ = plot_curves(rows).axes

    assert psnr_axes.get_legend() is not None
    assert psnr_axes.xaxis.get_gridlines()[0].get_visible()


def test_plot_curves_rejects_empty():
    with pytest.raises(ValueError, match="at least one metrics row"):
        plot_curves([])


def test_save_figure_writes_png(rows, tmp_path):
    path = save_figure(plot_curves(rows), tmp_path / "plots" / "curves.png")

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as saved:
        assert saved.width > 1000


# difference_map


def test_difference_map_known_values():
    image = np.array([[[10, 20, 30], [200, 0, 255]]], dtype=np.uint8)
    reference = np.array([[[13, 20, 25], [0, 1, 0]]], dtype=np.uint8)
    expected = np.array([[[12, 0, 20], [255, 4, 255]]], dtype=np.uint8)

    result = difference_map(image, reference)

    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, expected)


def test_difference_map_gain_one():
    generator = np.random.default_rng(0)
    image, reference = random_image(generator), random_image(generator)
    expected = np.abs(image.astype(int) - reference.astype(int))

    np.testing.assert_array_equal(difference_map(image, reference, gain=1.0), expected)


def test_difference_map_shape_mismatch():
    generator = np.random.default_rng(1)

    with pytest.raises(ValueError, match=r"\(16, 16, 3\) and \(16, 8, 3\)"):
        difference_map(random_image(generator), random_image(generator, 16, 8))


def test_difference_map_rejects_float():
    with pytest.raises(TypeError, match="uint8"):
        difference_map(np.zeros((4, 4, 3)), np.zeros((4, 4, 3), dtype=np.uint8))


# image_grid and side_by_side


def chains(generator: np.random.Generator, step_count: int, height: int = 16, width: int = 16) -> dict:
    return {
        model: [random_image(generator, height, width) for _ in range(step_count)]
        for model in (MODEL_A, MODEL_B)
    }


def test_default_grid_steps():
    assert default_grid_steps(1) == [1]
    assert default_grid_steps(3) == [1, 3]
    assert default_grid_steps(5) == [1, 5]
    assert default_grid_steps(25) == [1, 5, 15, 25]
    assert default_grid_steps(30) == [1, 5, 15, 25, 30]


def test_image_grid_default_shape():
    generator = np.random.default_rng(2)
    source = random_image(generator)

    grid = image_grid(source, chains(generator, 30), labels=False)

    # 2 model rows; source plus steps 1, 5, 15, 25 and 30 make 6 columns.
    assert grid.shape == (2 * 16 + GRID_GAP, 6 * 16 + 5 * GRID_GAP, 3)
    assert grid.dtype == np.uint8


def test_image_grid_given_steps_cells():
    generator = np.random.default_rng(3)
    source = random_image(generator, 16, 24)
    images = chains(generator, 10, 16, 24)

    grid = image_grid(source, images, steps=[2, 7], labels=False)
    second_row = 16 + GRID_GAP
    third_column = 2 * (24 + GRID_GAP)

    assert grid.shape == (2 * 16 + GRID_GAP, 3 * 24 + 2 * GRID_GAP, 3)
    np.testing.assert_array_equal(grid[:16, :24], source)
    np.testing.assert_array_equal(grid[second_row:, :24], source)
    np.testing.assert_array_equal(grid[second_row:, third_column:], images[MODEL_B][6])
    np.testing.assert_array_equal(grid[:16, 24 + GRID_GAP:2 * 24 + GRID_GAP], images[MODEL_A][1])


def test_image_grid_labels_add_bands():
    generator = np.random.default_rng(4)
    source = random_image(generator, 96, 96)
    images = chains(generator, 3, 96, 96)

    plain = image_grid(source, images, labels=False)
    labelled = image_grid(source, images, labels=True)
    top_band = labelled.shape[0] - plain.shape[0]
    left_band = labelled.shape[1] - plain.shape[1]

    assert top_band > 0
    assert left_band > 0
    assert (labelled[:top_band] < 128).any(), "the column captions drew no dark pixels"
    assert (labelled[top_band:, :left_band] < 128).any(), "the model names drew no dark pixels"
    np.testing.assert_array_equal(labelled[top_band:, left_band:], plain)


def test_image_grid_size_mismatch():
    generator = np.random.default_rng(5)
    images = chains(generator, 3)
    images[MODEL_B][2] = random_image(generator, 8, 16)

    with pytest.raises(ValueError, match=r"reed-mini:reed at step 3 has \(8, 16, 3\)"):
        image_grid(random_image(generator), images)


def test_image_grid_step_out_of_range():
    generator = np.random.default_rng(6)

    with pytest.raises(ValueError, match=r"\[4\] are out of range"):
        image_grid(random_image(generator), chains(generator, 3), steps=[1, 4])


def test_side_by_side_places_both():
    generator = np.random.default_rng(7)
    left, right = random_image(generator, 64, 64), random_image(generator, 64, 64)

    combined = side_by_side(left, right, "before", "after")
    top_band = combined.shape[0] - 64

    assert combined.shape == (64 + top_band, 2 * 64 + GRID_GAP, 3)
    assert top_band > 0
    np.testing.assert_array_equal(combined[top_band:, :64], left)
    np.testing.assert_array_equal(combined[top_band:, 64 + GRID_GAP:], right)


def test_side_by_side_shape_mismatch():
    generator = np.random.default_rng(8)

    with pytest.raises(ValueError, match="one shape"):
        side_by_side(random_image(generator), random_image(generator, 8, 8), "before", "after")


# safe_name and save_images


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("reed-mini:reed", "reed-mini_reed"),
        ("stabilityai/sd-vae-ft-mse", "stabilityai_sd-vae-ft-mse"),
        ("photo 01.JPG", "photo_01.JPG"),
        ("café", "caf_"),
        ("..", "__"),
        ("a/../b", "a_.._b"),
    ],
)
def test_safe_name_cases(text, expected):
    assert safe_name(text) == expected


def test_safe_name_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        safe_name("")


def test_save_images_file_names(tmp_path):
    generator = np.random.default_rng(9)
    images = {"reed-mini:reed": [random_image(generator) for _ in OPS],
              "stabilityai/sd-vae-ft-mse": [random_image(generator) for _ in OPS]}

    paths = save_images(images, tmp_path, "cat.png", OPS)
    names = [path.relative_to(tmp_path).as_posix() for path in paths]

    assert names == [
        "images/cat.png/reed-mini_reed/step-001-roundtrip.png",
        "images/cat.png/reed-mini_reed/step-002-rotate.png",
        "images/cat.png/reed-mini_reed/step-003-roundtrip.png",
        "images/cat.png/stabilityai_sd-vae-ft-mse/step-001-roundtrip.png",
        "images/cat.png/stabilityai_sd-vae-ft-mse/step-002-rotate.png",
        "images/cat.png/stabilityai_sd-vae-ft-mse/step-003-roundtrip.png",
    ]


def test_save_images_pixels_round_trip(tmp_path):
    generator = np.random.default_rng(10)
    images = {MODEL_A: [random_image(generator) for _ in OPS]}

    paths = save_images(images, tmp_path, "dog", OPS)

    with Image.open(paths[1]) as saved:
        np.testing.assert_array_equal(np.asarray(saved), images[MODEL_A][1])


def test_save_images_ops_count_mismatch(tmp_path):
    generator = np.random.default_rng(11)

    with pytest.raises(ValueError, match="has 2 images and ops has 3"):
        save_images({MODEL_A: [random_image(generator)] * 2}, tmp_path, "cat", OPS)


def test_save_images_folder_collision(tmp_path):
    generator = np.random.default_rng(12)
    chain = [random_image(generator) for _ in OPS]

    with pytest.raises(ValueError, match="both be saved in the folder 'a_b'"):
        save_images({"a:b": chain, "a/b": chain}, tmp_path, "cat", OPS)


def test_report_imports_no_gradio():
    # A fresh interpreter, because this test session may already have loaded either module.
    code = "import sys, reed.report; print('gradio' in sys.modules, 'matplotlib.pyplot' in sys.modules)"
    repository_root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repository_root
    )

    assert result.stdout.split() == ["False", "False"]
