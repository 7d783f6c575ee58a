"""Tables, plots, image grids and files on disk for the results of an edit chain.

Conventions:
- An image is a ``numpy.ndarray`` of shape (H, W, 3) and dtype uint8, as in ``reed.images``.
- A chain's images for one model are a list whose index 0 contains the output of step 1.
- A metrics row is a dict with the keys in ``METRIC_KEYS``: ``image`` (source photo name), ``model``
  (model reference such as ``reed-mini:standard``), ``step`` (1-based), ``op`` (operation at that
  step, such as ``roundtrip`` or ``rotate``), then MSE, PSNR (dB), SSIM and LPIPS against the source
  image (``*_src``) and against the output of step 1 (``*_x1``), then ``seconds``. At step 1 the
  ``*_x1`` values compare x1 with itself (MSE 0, PSNR capped at 100 dB, SSIM 1). ``lpips_*`` is
  ``None`` when LPIPS was unavailable; it stays ``None`` here (null in JSON, an empty CSV cell,
  "n/a" in tables), never 0.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas and never touch pyplot, so
they can be drawn from several threads of a web server at once.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

METRIC_KEYS = [
    "image", "model", "step", "op",
    "mse_src", "psnr_src", "ssim_src", "lpips_src",
    "mse_x1", "psnr_x1", "ssim_x1", "lpips_x1",
    "seconds",
]
_FLOAT_KEYS = [key for key in METRIC_KEYS if key not in ("image", "model", "step", "op")]

# Steps that ``image_grid`` shows when none are given. The last step of the chain is always added.
DEFAULT_GRID_STEPS = (1, 5, 15, 25)
# White pixels between the cells of a grid, in both directions.
GRID_GAP = 2
# Resolution of PNG figures written by ``save_figure``, in dots per inch.
FIGURE_DPI = 150

_BACKGROUND = 255
_TEXT_COLOR = (0, 0, 0)


# Metrics rows


def _check_rows(rows: Sequence[Mapping]) -> None:
    """Raise ValueError naming the first row that lacks any of ``METRIC_KEYS``."""
    for index, row in enumerate(rows):
        missing = [key for key in METRIC_KEYS if key not in row]
        if missing:
            raise ValueError(f"Metrics row {index} is missing the keys {missing}. Every row needs {METRIC_KEYS}.")


def _check_finite(rows: Sequence[Mapping]) -> None:
    """Raise ValueError on a NaN or infinite metric, which strict JSON cannot hold."""
    for index, row in enumerate(rows):
        for key in _FLOAT_KEYS:
            value = row[key]
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(
                    f"Metrics row {index} ({row['model']}, {row['image']}, step {row['step']}) has {key}={value}. "
                    "JSON has no NaN or infinity, so store a finite number or None (unavailable)."
                )


def _csv_columns(rows: Sequence[Mapping]) -> list[str]:
    """Return ``METRIC_KEYS`` followed by any extra keys in the order they first appear."""
    columns = list(METRIC_KEYS)
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    return columns


def write_metrics(rows: Sequence[Mapping], out_dir: str | Path) -> tuple[Path, Path]:
    """Write the rows to ``metrics.json`` and ``metrics.csv`` in ``out_dir``, creating the folder.

    JSON keeps None as null, and CSV writes it as an empty cell. Floats are written in full
    precision. Returns the paths of the JSON and the CSV file.
    """
    rows = list(rows)
    _check_rows(rows)
    _check_finite(rows)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "metrics.json"
    csv_path = out_dir / "metrics.csv"

    with json_path.open("w", encoding="utf-8") as file:
        json.dump([dict(row) for row in rows], file, indent=2, allow_nan=False)
        file.write("\n")

    # csv writes None as an empty string, which is the intended "unavailable" cell.
    with csv_path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=_csv_columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)

    return json_path, csv_path


def _round_decimals(digits: int) -> Callable[[float], float]:
    return functools.partial(round, ndigits=digits)


def _round_significant(digits: int) -> Callable[[float], float]:
    return lambda value: float(f"{value:.{digits}g}")


# (header, row key, rounding) for each column of ``rows_to_table``.
_TABLE_SPEC = [
    ("image", "image", None),
    ("model", "model", None),
    ("step", "step", None),
    ("op", "op", None),
    ("MSE vs source", "mse_src", _round_significant(6)),
    ("PSNR vs source (dB)", "psnr_src", _round_decimals(2)),
    ("SSIM vs source", "ssim_src", _round_decimals(4)),
    ("LPIPS vs source", "lpips_src", _round_decimals(4)),
    ("MSE vs x1", "mse_x1", _round_significant(6)),
    ("PSNR vs x1 (dB)", "psnr_x1", _round_decimals(2)),
    ("SSIM vs x1", "ssim_x1", _round_decimals(4)),
    ("LPIPS vs x1", "lpips_x1", _round_decimals(4)),
    ("time (s)", "seconds", _round_decimals(2)),
]
TABLE_COLUMNS = [header for header, _, _ in _TABLE_SPEC]


def rows_to_table(rows: Sequence[Mapping]) -> list[list]:
    """Convert metrics rows to display rows under ``TABLE_COLUMNS``.

    PSNR keeps 2 decimals, SSIM and LPIPS 4, MSE 6 significant digits and time 2 decimals.
    None becomes the string "n/a". Extra keys in the rows are left out.
    """
    rows = list(rows)
    _check_rows(rows)
    table = []
    for row in rows:
        cells = []
        for _, key, rounding in _TABLE_SPEC:
            value = row[key]
            if value is None:
                cells.append("n/a")
            elif rounding is None:
                cells.append(value)
            else:
                cells.append(rounding(value))
        table.append(cells)
    return table


# Curves


def _mean_by_model_step(rows: Sequence[Mapping], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Average ``key`` over images for each (model, step), and return sorted steps and means per model.

    A None value is skipped, and a (model, step) with no value left gets no point.
    """
    values: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        per_step = values.setdefault(row["model"], {})
        if row[key] is not None:
            per_step.setdefault(int(row["step"]), []).append(float(row[key]))

    curves = {}
    for model, per_step in values.items():
        steps = sorted(per_step)
        curves[model] = (steps, [float(np.mean(per_step[step])) for step in steps])
    return curves


def _edit_steps(rows: Sequence[Mapping]) -> dict[int, str]:
    """Return the steps whose op is not ``roundtrip``, taken from the first row's image and model."""
    first = rows[0]
    return {
        int(row["step"]): row["op"]
        for row in rows
        if row["image"] == first["image"] and row["model"] == first["model"] and row["op"] != "roundtrip"
    }


def _draw_panel(axes, rows: Sequence[Mapping], metric: str, ylabel: str, edit_steps: dict[int, str]) -> None:
    """Draw one metric against step: a solid line vs x1 and a dashed line vs source for each model."""
    # Only the first marker gets a legend entry, which lists every op that is marked.
    label = f"edit step ({', '.join(sorted(set(edit_steps.values())))})"
    for step in sorted(edit_steps):
        axes.axvline(step, color="0.85", linewidth=1.0, zorder=0, label=label)
        label = None

    versus_x1 = _mean_by_model_step(rows, f"{metric}_x1")
    versus_source = _mean_by_model_step(rows, f"{metric}_src")
    for model_index, model in enumerate(versus_source):
        color = f"C{model_index % 10}"
        # Step 1 is left out of the x1 line: there x1 is compared with itself (PSNR at the 100 dB cap),
        # which carries no information and would stretch the PSNR axis far above every other point.
        steps, means = versus_x1[model]
        points = [(step, mean) for step, mean in zip(steps, means) if step != 1]
        if points:
            axes.plot(*zip(*points), color=color, linestyle="-", marker=".", label=f"{model} vs x1")
        steps, means = versus_source[model]
        if steps:
            axes.plot(steps, means, color=color, linestyle="--", marker=".", label=f"{model} vs source")

    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")


def plot_curves(rows: Sequence[Mapping], title: str | None = None) -> Figure:
    """Plot PSNR and SSIM against step, side by side, for every model in the rows.

    Each model gets a solid line against x1 (the output of step 1, from step 2 on) and a dashed line
    against the source. With several images, each point is the mean over the images that have it,
    and the title gives the image count. Light vertical lines mark steps whose op is not
    ``roundtrip``, read from the first row's image and model.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("plot_curves needs at least one metrics row, got none.")
    _check_rows(rows)

    figure = Figure(figsize=(11.0, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    psnr_axes, ssim_axes = figure.subplots(1, 2)
    edit_steps = _edit_steps(rows)
    _draw_panel(psnr_axes, rows, "psnr", "PSNR (dB)", edit_steps)
    _draw_panel(ssim_axes, rows, "ssim", "SSIM (1 = identical)", edit_steps)

    images = list(dict.fromkeys(row["image"] for row in rows))
    heading = title or "Quality over the edit chain"
    if len(images) > 1:
        heading += f" (mean over {len(images)} images)"
    else:
        heading += f" ({images[0]})"
    figure.suptitle(heading)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Save the figure as a PNG at ``FIGURE_DPI``, creating the parent folder, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=FIGURE_DPI)
    return path


# Images


def _check_image(image: np.ndarray, name: str) -> None:
    """Raise TypeError or ValueError unless ``image`` is a uint8 (H, W, 3) array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise TypeError(f"{name} must be a uint8 numpy array, got {kind}.")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {image.shape}.")


def difference_map(image: np.ndarray, reference: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """Compute |image - reference| per channel, multiplied by ``gain`` and clipped to a uint8 image.

    A gain above 1 makes drifts of a few levels visible. Raises ValueError when the shapes differ.
    """
    _check_image(image, "image")
    _check_image(reference, "reference")
    if image.shape != reference.shape:
        raise ValueError(f"image and reference must have one shape, got {image.shape} and {reference.shape}.")
    if not gain > 0:
        raise ValueError(f"gain must be positive, got {gain}.")

    difference = np.abs(image.astype(np.float32) - reference.astype(np.float32)) * gain
    return np.clip(np.rint(difference), 0, 255).astype(np.uint8)


def _caption_font(image_height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Load Pillow's built-in font at a size that grows with the image, so it works without font files.

    ``load_default(size=...)`` needs Pillow 10.1 or later. Without FreeType, Pillow returns its bitmap
    font, whose size is fixed.
    """
    return ImageFont.load_default(size=max(10, round(image_height / 20)))


def _text_size(font, text: str) -> tuple[int, int]:
    """Return the width and the height below the drawing origin of ``text`` in ``font``."""
    _, _, right, bottom = font.getbbox(text)
    return int(math.ceil(right)), int(math.ceil(bottom))


def _compose(
    cells: list[list[np.ndarray]],
    column_captions: list[str] | None = None,
    row_captions: list[str] | None = None,
) -> np.ndarray:
    """Lay out equally sized images in rows and columns on white, with optional caption bands.

    Column captions go in a band above the grid and row captions in a band at its left. A column is
    widened, with its images centred, when its caption is wider than the images.
    """
    height, width = cells[0][0].shape[:2]
    row_count, column_count = len(cells), len(cells[0])

    font = _caption_font(height) if column_captions or row_captions else None
    padding = max(2, height // 64)
    top_band = 0
    left_band = 0
    column_width = width
    if column_captions:
        caption_sizes = [_text_size(font, caption) for caption in column_captions]
        top_band = _text_size(font, "Ag")[1] + 2 * padding
        column_width = max(width, max(size[0] for size in caption_sizes) + 2 * padding)
    if row_captions:
        left_band = max(_text_size(font, caption)[0] for caption in row_captions) + 2 * padding

    grid_height = top_band + row_count * height + (row_count - 1) * GRID_GAP
    grid_width = left_band + column_count * column_width + (column_count - 1) * GRID_GAP
    grid = np.full((grid_height, grid_width, 3), _BACKGROUND, dtype=np.uint8)
    for row_index, row in enumerate(cells):
        y = top_band + row_index * (height + GRID_GAP)
        for column_index, image in enumerate(row):
            x = left_band + column_index * (column_width + GRID_GAP) + (column_width - width) // 2
            grid[y:y + height, x:x + width] = image

    if font is None:
        return grid

    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    for column_index, caption in enumerate(column_captions or []):
        caption_width = _text_size(font, caption)[0]
        x = left_band + column_index * (column_width + GRID_GAP) + (column_width - caption_width) // 2
        draw.text((x, padding), caption, fill=_TEXT_COLOR, font=font)
    for row_index, caption in enumerate(row_captions or []):
        caption_height = _text_size(font, caption)[1]
        y = top_band + row_index * (height + GRID_GAP) + (height - caption_height) // 2
        draw.text((padding, y), caption, fill=_TEXT_COLOR, font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()


def default_grid_steps(step_count: int) -> list[int]:
    """Return the steps of ``DEFAULT_GRID_STEPS`` that exist in a chain of ``step_count`` steps, plus the last."""
    if step_count < 1:
        raise ValueError(f"A chain needs at least one step, got {step_count}.")
    steps = [step for step in DEFAULT_GRID_STEPS if step <= step_count]
    if step_count not in steps:
        steps.append(step_count)
    return steps


def image_grid(
    source: np.ndarray,
    images_by_model: Mapping[str, Sequence[np.ndarray]],
    steps: Sequence[int] | None = None,
    labels: bool = True,
) -> np.ndarray:
    """Build a uint8 grid with one row per model: the source image, then the output of each chosen step.

    ``steps`` are 1-based and default to ``default_grid_steps`` of the shortest chain. With
    ``labels`` a band above the columns names them ("source", "step 5") and a band at the left names
    each row's model. Raises ValueError when images differ in size or a step is out of range.
    """
    if not images_by_model:
        raise ValueError("images_by_model is empty, so there is no row to draw.")
    _check_image(source, "source")
    for model, images in images_by_model.items():
        for index, image in enumerate(images):
            _check_image(image, f"image of {model} at step {index + 1}")
            if image.shape != source.shape:
                raise ValueError(
                    f"All grid images must have the source shape {source.shape}, "
                    f"but {model} at step {index + 1} has {image.shape}."
                )

    if steps is None:
        steps = default_grid_steps(min(len(images) for images in images_by_model.values()))
    steps = list(steps)
    for model, images in images_by_model.items():
        invalid = [step for step in steps if not 1 <= step <= len(images)]
        if invalid:
            raise ValueError(f"Steps {invalid} are out of range for {model}, which has steps 1 to {len(images)}.")

    cells = [[source] + [images[step - 1] for step in steps] for images in images_by_model.values()]
    if not labels:
        return _compose(cells)
    column_captions = ["source"] + [f"step {step}" for step in steps]
    return _compose(cells, column_captions, list(images_by_model))


def side_by_side(left: np.ndarray, right: np.ndarray, label_left: str, label_right: str) -> np.ndarray:
    """Place two images of one shape next to each other with a caption above each."""
    _check_image(left, "left")
    _check_image(right, "right")
    if left.shape != right.shape:
        raise ValueError(f"left and right must have one shape, got {left.shape} and {right.shape}.")
    return _compose([[left, right]], [label_left, label_right])


# Files


def safe_name(text: str) -> str:
    """Replace every character other than ASCII letters, digits, ``-``, ``_`` and ``.`` with ``_``.

    The result is usable as one file or folder name. "." and ".." become "_" and "__" so they cannot
    point at a folder. Raises ValueError for an empty name.
    """
    if not text:
        raise ValueError("A name for a file or folder must not be empty.")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    if name in (".", ".."):
        name = name.replace(".", "_")
    return name


def remove_previous_run(out_dir: str | Path) -> int:
    """Delete the files an earlier ``ladder`` or ``chain`` run wrote into ``out_dir`` and return their count.

    Only the file names this module writes are deleted (metrics, curves, grids and
    ``images/*/*/step-*.png``), then the folders they leave empty. Other files in the folder stay. Without
    this, a rerun with fewer steps, images or models would leave the earlier run's images next to the
    new metrics.
    """
    out_dir = Path(out_dir)
    outputs = [out_dir / "metrics.json", out_dir / "metrics.csv", out_dir / "curves.png",
               *out_dir.glob("grid-*.png"), *out_dir.glob("images/*/*/step-*.png")]
    removed = 0
    for path in outputs:
        if path.is_file():
            path.unlink()
            removed += 1
    # Deepest folders first, so a parent is empty by the time it is checked.
    folders = [*out_dir.glob("images/*/*"), *out_dir.glob("images/*"), out_dir / "images"]
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def save_images(
    images_by_model: Mapping[str, Sequence[np.ndarray]],
    out_dir: str | Path,
    image_name: str,
    ops: Sequence[str],
) -> list[Path]:
    """Write each model's output after every step as ``images/<image>/<model>/step-003-rotate.png``.

    ``ops[i]`` names the operation of step ``i + 1``. The image, model and op names pass through
    ``safe_name``. Returns the written paths, model by model, in step order. Raises ValueError when
    a model's step count differs from ``len(ops)`` or two models map to the same folder name.
    """
    folders: dict[str, str] = {}
    for model, images in images_by_model.items():
        if len(images) != len(ops):
            raise ValueError(
                f"ops must name one operation per step, but {model} has {len(images)} images and ops has {len(ops)}."
            )
        folder = safe_name(model)
        if folder in folders:
            raise ValueError(f"Models {folders[folder]!r} and {model!r} would both be saved in the folder {folder!r}.")
        folders[folder] = model

    image_dir = Path(out_dir) / "images" / safe_name(image_name)
    paths = []
    for folder, model in folders.items():
        model_dir = image_dir / folder
        model_dir.mkdir(parents=True, exist_ok=True)
        for step, (image, op) in enumerate(zip(images_by_model[model], ops), start=1):
            _check_image(image, f"image of {model} at step {step}")
            path = model_dir / f"step-{step:03d}-{safe_name(op)}.png"
            Image.fromarray(image).save(path)
            paths.append(path)
    return paths
