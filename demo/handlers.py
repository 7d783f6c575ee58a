"""Handlers of the REED comparison app: plain functions that the Gradio UI calls and tests import.

Nothing here builds UI components. Each public handler converts the library's errors (an unreadable
photo, an invalid chain, a model that cannot be loaded) into ``gr.Error`` with a message for the visitor.

Images are uint8 arrays of shape (H, W, 3), as everywhere in ``reed``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from reed import chain, data, metrics, models, report
from reed.chain import Step
from reed.edits import OPERATIONS, get_operation
from reed.edits.diffusion import RECTANGLE
from reed.images import MAX_SIDE, ImageLoadError, load_image, resize_to_working_size, save_png
from demo.runs import new_run_folder, zip_folder

# Working sizes offered by the app: the shorter side in pixels, or None to keep the photo's own size.
WORKING_SIZES: dict[str, int | None] = {"128": 128, "256": 256, "512": 512, "original": None}
DEFAULT_WORKING_SIZE = "256"
# Longer side of a photo run at its "original" size. Larger photos are resized down to it, which bounds
# the time and memory of one step.
ORIGINAL_MAX_SIDE = 1024
# Smallest working size accepted from code (the UI offers only WORKING_SIZES): 4x4 latents at factor 8.
MIN_WORKING_SIZE = 32
# Maximum number of steps in one request. The library allows chain.MAX_STEPS, but the app shares its
# CPU with every visitor in the queue.
MAX_APP_STEPS = 100
# Largest seed accepted, so it fits the unsigned 32-bit seeds most tools use.
MAX_SEED = 2**32 - 1
# Default factor by which the difference maps multiply |image - reference|.
DEFAULT_GAIN = 8.0
RESULTS_ZIP = "reed-results.zip"

PRESETS = {
    "25 round trips": "roundtrip*25",
    "Mixed session": ("roundtrip*5 | rotate degrees=3 | roundtrip*5 | jpeg quality=85 | roundtrip*5 | "
                      "brightness factor=1.05 | roundtrip*5 | crop fraction=0.95 | roundtrip*4"),
}
DEFAULT_CHAIN = PRESETS["25 round trips"]

ProgressTracker = Callable[..., Any]

logger = logging.getLogger(__name__)

# Copies of the example photos. Gradio serves files from the temp directory without extra allowed_paths,
# but not from the installed packages that hold the originals.
EXAMPLES_FOLDER = Path(tempfile.gettempdir()) / "reed-demo-examples"
# Masks drawn in the app and reference images uploaded to it, named by their content hash.
INPUTS_FOLDER = Path(tempfile.gettempdir()) / "reed-demo-inputs"
# Operation parameters that name a file on the server. The app accepts only files under the temp
# directory, where uploads and drawn masks are stored, so a visitor cannot make it read other files.
FILE_PARAMS = ("mask", "reference")


# Photo


@dataclass
class PreparedImage:
    """The photo at its working size, its display name, and what was changed on the way in."""

    pixels: np.ndarray
    name: str
    notes: list[str] = field(default_factory=list)


def example_photos() -> dict[str, Path]:
    """Copy the held-out photos (never used for training) into ``EXAMPLES_FOLDER`` and return them by name.

    A photo whose package is not installed is left out with a warning, so the app still starts.
    """
    EXAMPLES_FOLDER.mkdir(parents=True, exist_ok=True)
    photos = {}
    for photo in data.HELD_OUT:
        try:
            original = data.bundled_path(photo)
        except FileNotFoundError as error:
            logger.warning("example photo %s left out: %s", photo.name, error)
            continue
        target = EXAMPLES_FOLDER / f"{photo.name}{original.suffix}"
        if not target.is_file() or target.stat().st_size != original.stat().st_size:
            # Copy under a temporary name first, so another process never reads a half-written file.
            partial = target.with_name(f".{target.name}.{os.getpid()}")
            shutil.copyfile(original, partial)
            os.replace(partial, target)
        photos[photo.name] = target
    return photos


def example_photo(index: int) -> str:
    """Return the path of the example photo at ``index`` in the order of ``example_photos``."""
    photos = list(example_photos().values())
    if not 0 <= index < len(photos):
        raise gr.Error(f"There is no example photo number {index + 1}.", title="Unknown example")
    return str(photos[index])


def parse_working_size(choice: str | int | None) -> int | None:
    """Convert a working-size choice ("256", 256 or "original") to the shorter side in pixels, or None."""
    if choice is None or str(choice).strip() == "":
        choice = DEFAULT_WORKING_SIZE
    text = str(choice).strip().lower()
    if text in WORKING_SIZES:
        return WORKING_SIZES[text]
    try:
        size = int(text)
    except ValueError:
        raise gr.Error(f"Invalid working size '{choice}': choose one of {', '.join(WORKING_SIZES)}.",
                       title="Invalid working size") from None
    if size < MIN_WORKING_SIZE or size > ORIGINAL_MAX_SIDE or size % 8:
        raise gr.Error(f"Invalid working size {size}: use a multiple of 8 from {MIN_WORKING_SIZE} to "
                       f"{ORIGINAL_MAX_SIDE} pixels.", title="Invalid working size")
    return size


def prepare_image(image_path: str | Path | None, working_size: str | int | None = DEFAULT_WORKING_SIZE) -> PreparedImage:
    """Load a photo and resize it to the working size, with a note for the visitor about each change."""
    if image_path is None or str(image_path).strip() == "":
        raise gr.Error("Upload a photo or click one of the example photos first.", title="No photo")
    size = parse_working_size(working_size)
    try:
        loaded = load_image(image_path, max_side=ORIGINAL_MAX_SIDE if size is None else MAX_SIDE)
    except ImageLoadError as error:
        raise gr.Error(str(error), title="Could not read the photo") from error

    notes = list(loaded.notes)
    height, width = loaded.pixels.shape[:2]
    pixels = resize_to_working_size(loaded.pixels, size)
    new_height, new_width = pixels.shape[:2]
    if size is None:
        notes.append(f"Working at the photo's own size, {width}x{height} pixels.")
    elif (new_height, new_width) != (height, width):
        direction = "Enlarged" if new_height * new_width > height * width else "Resized"
        notes.append(f"{direction} from {width}x{height} to {new_width}x{new_height} pixels: the shorter side "
                     f"is {size}, and the longer side is centre-cropped to a multiple of 8.")
    return PreparedImage(pixels, Path(str(image_path)).stem or "image", notes)


def preview_image(image_path: str | Path | None, working_size: str | int | None) -> tuple[np.ndarray | None, str]:
    """Return the photo as the models will see it and its notes as Markdown; (None, "") without a photo."""
    if image_path is None:
        return None, ""
    prepared = prepare_image(image_path, working_size)
    height, width = prepared.pixels.shape[:2]
    lines = [f"**{prepared.name}**, {width}x{height} pixels."] + prepared.notes
    return prepared.pixels, "\n".join(f"- {line}" for line in lines)


# Chain builder


@dataclass(frozen=True)
class ParamField:
    """One parameter of an operation as the chain builder shows it: name, default as text, and help."""

    name: str
    value: str
    info: str


def operation_names() -> list[str]:
    """Return the names of all operations, ``roundtrip`` first and the rest in alphabetical order."""
    return sorted(OPERATIONS, key=lambda name: (name != "roundtrip", name))


def parameter_fields(op_name: str) -> list[ParamField]:
    """Describe each parameter of an operation: its name, default as text, and help with its range."""
    operation = _operation_or_error(op_name)
    fields = []
    for param in operation.params:
        if param.choices:
            allowed = "one of " + ", ".join(param.choices)
        elif param.minimum is not None and param.maximum is not None:
            allowed = f"{param.minimum:g} to {param.maximum:g}"
        else:
            allowed = "text" if param.kind is str else param.kind.__name__
        default = "" if param.default is None else _format_number(param.default)
        fields.append(ParamField(param.name, default, f"{param.help} ({allowed})"))
    return fields


def operation_help(op_name: str) -> str:
    """Return a one-line Markdown description of an operation, with the reason when it is unavailable."""
    operation = _operation_or_error(op_name)
    text = f"**{operation.name}**: {operation.help}."
    reason = unavailable_reason(op_name)
    if reason:
        text += f"\n\n**Unavailable with its default model:** {reason}"
    return text


def unavailable_reason(op_name: str) -> str | None:
    """Return why an operation cannot run with its default parameters, or None when it can."""
    operation = _operation_or_error(op_name)
    return operation.unavailable_reason() if operation.unavailable_reason else None


def operation_choices() -> list[tuple[str, str]]:
    """Return (label, name) pairs in the order of ``operation_names``, labelling unavailable operations."""
    return [(f"{name} (unavailable: see below)" if unavailable_reason(name) else name, name)
            for name in operation_names()]


def add_step(chain_text: str | None, op_name: str, repeat: int | float, values: Sequence[Any]) -> str:
    """Append one step (``repeat`` times) to the chain text and return the new text.

    ``values`` are the builder's fields in the order of the operation's parameters; an empty field
    takes the default. Parameters equal to their default are left out of the text.
    """
    operation = _operation_or_error(op_name)
    entered = {param.name: value for param, value in zip(operation.params, values)
               if value is not None and str(value).strip() != ""}
    try:
        resolved = operation.resolve(entered)
    except ValueError as error:
        raise gr.Error(str(error), title="Invalid parameter") from error
    count = _whole_number(repeat, "Repeat", minimum=1, maximum=MAX_APP_STEPS)
    new_text = chain.chain_to_text([Step(operation.name, resolved)] * count)

    current = (chain_text or "").rstrip()
    if not current:
        return new_text
    separator = "\n" if "\n" in current else " | "
    return current + separator + new_text


def preset_chain(name: str) -> str:
    """Return the chain text of a preset."""
    if name not in PRESETS:
        raise gr.Error(f"Unknown preset '{name}'. Presets: {', '.join(PRESETS)}.", title="Unknown preset")
    return PRESETS[name]


def parse_app_chain(chain_text: str | None) -> list[Step]:
    """Parse the chain text or JSON and enforce ``MAX_APP_STEPS``, raising ``gr.Error`` on any problem."""
    if chain_text is None or not chain_text.strip():
        raise gr.Error(f"The edit chain is empty. Type one, such as {DEFAULT_CHAIN}, or click a preset.",
                       title="Invalid edit chain")
    try:
        steps = chain.load_chain(chain_text)
    except ValueError as error:
        raise gr.Error(f"{error} Example of a valid chain: roundtrip*5 | rotate degrees=3 | roundtrip*5",
                       title="Invalid edit chain") from error
    if len(steps) > MAX_APP_STEPS:
        raise gr.Error(f"The chain has {len(steps)} steps, but this app runs at most {MAX_APP_STEPS} per "
                       "request so that other visitors are not kept waiting. Shorten the chain, or run it "
                       "with reed.chain.run_chain in Python.", title="Chain too long")
    _check_file_params(steps)
    return steps


def _check_file_params(steps: Sequence[Step]) -> None:
    """Raise ``gr.Error`` for a mask or reference file outside the temp directory (see ``FILE_PARAMS``)."""
    allowed = Path(tempfile.gettempdir()).resolve()
    for step in steps:
        for name in FILE_PARAMS:
            value = step.params.get(name)
            if not isinstance(value, str) or RECTANGLE.match(value):
                continue
            if not Path(value).expanduser().resolve().is_relative_to(allowed):
                raise gr.Error(f"The {step.op} {name} '{value}' is outside the app's upload folder. Draw the mask "
                               "or upload the reference image in the app, and use the path it puts in the chain.",
                               title="Invalid edit chain")


# Diffusion inputs: masks and reference images


def _store_input(data: bytes, kind: str) -> Path:
    """Write ``data`` to ``INPUTS_FOLDER`` under a name made of its hash, and return the path."""
    INPUTS_FOLDER.mkdir(parents=True, exist_ok=True)
    target = INPUTS_FOLDER / f"{kind}-{hashlib.sha256(data).hexdigest()[:16]}.png"
    if not target.is_file():
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        partial.write_bytes(data)
        os.replace(partial, target)
    return target


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_mask(editor_value: dict[str, Any] | None) -> str:
    """Turn the brush strokes of the mask editor into a mask file and return its path.

    ``editor_value`` is the ``gr.ImageEditor`` value with numpy layers. Every painted pixel (alpha above
    zero in any layer) becomes white, the region that inpaint and pbe repaint; the rest is black.
    """
    layers = [layer for layer in (editor_value or {}).get("layers") or [] if layer is not None]
    if not layers:
        raise gr.Error("Paint over the part of the photo to change, then press the button again.", title="No mask drawn")
    painted = np.zeros(layers[0].shape[:2], dtype=bool)
    for layer in layers:
        layer = np.asarray(layer)
        if layer.shape[:2] != painted.shape:
            raise gr.Error("The mask layers have different sizes; clear the drawing and paint again.",
                           title="Invalid mask")
        if layer.ndim == 3 and layer.shape[2] == 4:
            painted |= layer[..., 3] > 0
        else:
            # A layer without alpha counts every non-black pixel as painted.
            painted |= layer.reshape(painted.shape + (-1,)).max(axis=-1) > 0
    if not painted.any():
        raise gr.Error("The drawing is empty. Paint over the part of the photo to change.", title="No mask drawn")
    mask = Image.fromarray(np.where(painted, 255, 0).astype(np.uint8))
    return str(_store_input(_png_bytes(mask), "mask"))


def save_reference(image_path: str | Path | None) -> str:
    """Copy an uploaded reference image (for pbe) into ``INPUTS_FOLDER`` as PNG and return the new path."""
    if image_path is None or str(image_path).strip() == "":
        raise gr.Error("Upload a reference image first.", title="No reference image")
    try:
        loaded = load_image(image_path)
    except ImageLoadError as error:
        raise gr.Error(str(error), title="Could not read the reference image") from error
    return str(_store_input(_png_bytes(Image.fromarray(loaded.pixels)), "reference"))


def parameter_index(op_name: str, param_name: str) -> int | None:
    """Return the position of ``param_name`` among the operation's parameters, or None if it has none."""
    operation = _operation_or_error(op_name)
    names = [param.name for param in operation.params]
    return names.index(param_name) if param_name in names else None


# Comparison


@dataclass(frozen=True)
class RunRecord:
    """The files of one comparison and the data the step slider needs to show any step.

    ``step_paths[model][i]`` is the PNG of that model's image after step ``i + 1``.
    """

    folder: Path
    image_name: str
    models: tuple[str, str]
    labels: dict[str, str]
    source_path: Path
    step_paths: dict[str, list[Path]]
    step_texts: list[str]
    rows: list[dict[str, Any]]

    @property
    def step_count(self) -> int:
        return len(self.step_texts)


@dataclass
class StepView:
    """Everything the results area shows for one step of a comparison."""

    step: int
    caption: str
    source: np.ndarray
    images: dict[str, np.ndarray]
    differences: dict[str, np.ndarray]
    metrics_markdown: str


@dataclass
class RunResult:
    """The outputs of one comparison."""

    record: RunRecord
    view: StepView
    figure: Figure
    table_headers: list[str]
    table_rows: list[list[Any]]
    files: list[Path]
    grid: np.ndarray
    notes: list[str]


def run_comparison(image_path: str | Path | None, chain_text: str | None, model_a: str | None,
                   model_b: str | None, working_size: str | int | None = DEFAULT_WORKING_SIZE,
                   seed: int | float | None = 0, progress: ProgressTracker | None = None) -> RunResult:
    """Run the chain on the photo with both models, write the result files, and return what to show.

    ``progress`` is called as ``progress(fraction_or_(done, total), desc=message)``, which is how
    ``gr.Progress`` is called. Every input problem raises ``gr.Error`` before any model runs.
    """
    steps = parse_app_chain(chain_text)
    seed_value = _whole_number(seed if seed is not None else 0, "Seed", minimum=0, maximum=MAX_SEED)
    references = _model_references(model_a, model_b)
    prepared = prepare_image(image_path, working_size)
    vaes = _load_models(references, progress)
    started = time.perf_counter()

    def report_progress(done: int, total: int, message: str) -> None:
        if progress is not None:
            progress((done, total), desc=message)

    try:
        result = chain.run_chain(prepared.pixels, steps, vaes, seed=seed_value, image_name=prepared.name,
                                 progress=report_progress)
    except models.ModelLoadError as error:
        # A diffusion edit's pipeline is loaded before the first step, so nothing has run yet.
        raise gr.Error(str(error), title="Could not load a diffusion model") from error
    except ValueError as error:
        # Parameters are validated when the chain is parsed, so this error comes from an operation
        # that rejected the image it was given, or from a pre-flight check of a diffusion edit.
        raise gr.Error(f"An edit in the chain failed: {error}", title="Edit failed") from error
    except (RuntimeError, MemoryError) as error:
        # A model or an edit failed while running: out of memory, or a VAE whose layers do not accept
        # 3-channel images. Gradio would show the visitor only "Error", so pass the message on.
        logger.exception("chain failed on %s with %s and %s", prepared.name, references[0], references[1])
        raise gr.Error(f"Running the chain failed ({type(error).__name__}: {error}). Try a smaller working size "
                       "or other models.", title="Run failed") from error
    seconds = time.perf_counter() - started

    folder = new_run_folder()
    height, width = prepared.pixels.shape[:2]
    logger.info("ran %d steps on %s at %dx%d with %s and %s in %.1f s; files in %s", len(steps), prepared.name,
                width, height, references[0], references[1], seconds, folder)
    figure = report.plot_curves(result.rows)
    record = _write_files(folder, result, figure)
    files = [folder / "metrics.csv", folder / "metrics.json", folder / "grid.png", folder / "curves.png"]
    files.append(zip_folder(folder, RESULTS_ZIP))

    notes = list(prepared.notes) + list(result.notes)
    notes.append(f"Ran {len(steps)} steps with 2 models at {width}x{height} pixels in {seconds:.1f} s.")
    if all(row["lpips_src"] is None for row in result.rows):
        notes.append(f"LPIPS is not shown: {metrics.lpips_unavailable_reason() or 'it was not computed'}.")

    return RunResult(
        record=record,
        view=show_step(record, record.step_count, DEFAULT_GAIN),
        figure=figure,
        table_headers=list(report.TABLE_COLUMNS),
        table_rows=report.rows_to_table(result.rows),
        files=files,
        grid=_read_png(folder / "grid.png"),
        notes=notes,
    )


def show_step(record: RunRecord | None, step: int | float, gain: float = DEFAULT_GAIN) -> StepView:
    """Build the views of one step: both models' images, their difference maps and their metrics."""
    if record is None:
        raise gr.Error("Run a comparison first; the step slider then shows each step.", title="No results yet")
    step = _whole_number(step, "Step", minimum=1, maximum=record.step_count)
    if gain is None or not gain > 0:
        raise gr.Error(f"Invalid amplification {gain}: it must be a positive number.", title="Invalid amplification")

    source = _read_png(record.source_path)
    images, differences = {}, {}
    for model in record.models:
        label = record.labels[model]
        image = _read_png(record.step_paths[model][step - 1])
        first = _read_png(record.step_paths[model][0])
        images[model] = image
        differences[model] = report.side_by_side(
            report.difference_map(image, source, gain), report.difference_map(image, first, gain),
            f"{label}: vs source, x{gain:g}", f"{label}: vs step 1 (x1), x{gain:g}")

    caption = f"**Step {step} of {record.step_count}**: `{record.step_texts[step - 1]}`"
    return StepView(step, caption, source, images, differences, _step_metrics_markdown(record, step))


def _write_files(folder: Path, result: chain.ChainResult, figure: Figure) -> RunRecord:
    """Write metrics, chain, source, step images, curves and grid into ``folder``; return the record."""
    report.write_metrics(result.rows, folder)
    (folder / "chain.txt").write_text(chain.chain_to_text(result.steps) + "\n", encoding="utf-8")
    (folder / "chain.json").write_text(_json_text(chain.chain_to_json(result.steps)), encoding="utf-8")
    source_path = folder / "source.png"
    save_png(result.source, source_path)

    ops = [step.op for step in result.steps]
    paths = report.save_images(result.images, folder, result.image_name, ops)
    step_count = len(result.steps)
    step_paths = {model: paths[index * step_count:(index + 1) * step_count]
                  for index, model in enumerate(result.arms)}

    labels = _display_labels(result.arms)
    report.save_figure(figure, folder / "curves.png")
    grid = report.image_grid(result.source, {labels[model]: result.images[model] for model in result.arms})
    save_png(grid, folder / "grid.png")

    return RunRecord(
        folder=folder,
        image_name=result.image_name,
        models=(result.arms[0], result.arms[1]),
        labels=labels,
        source_path=source_path,
        step_paths=step_paths,
        step_texts=[chain.chain_to_text([step]) for step in result.steps],
        rows=result.rows,
    )


def _step_metrics_markdown(record: RunRecord, step: int) -> str:
    """Return a Markdown table of both models' metrics at one step."""
    with_lpips = any(row["lpips_src"] is not None for row in record.rows)
    header = "| model | PSNR vs source | SSIM vs source | PSNR vs x1 | SSIM vs x1 |"
    rule = "|---|---|---|---|---|"
    if with_lpips:
        header += " LPIPS vs source |"
        rule += "---|"
    lines = [header, rule]
    for model in record.models:
        row = next(row for row in record.rows if row["model"] == model and row["step"] == step)
        if step == 1:
            versus_first = "(x1 itself) | (x1 itself)"
        else:
            versus_first = f"{row['psnr_x1']:.2f} dB | {row['ssim_x1']:.4f}"
        line = (f"| {record.labels[model]} | {row['psnr_src']:.2f} dB | {row['ssim_src']:.4f} | "
                f"{versus_first} |")
        if with_lpips:
            line += " n/a |" if row["lpips_src"] is None else f" {row['lpips_src']:.4f} |"
        lines.append(line)
    return "\n".join(lines)


# Helpers


def _operation_or_error(op_name: str | None):
    try:
        return get_operation(op_name or "")
    except ValueError as error:
        raise gr.Error(str(error), title="Unknown operation") from error


def _whole_number(value: Any, name: str, minimum: int, maximum: int) -> int:
    """Convert a number from a UI field to an int in [minimum, maximum], raising ``gr.Error`` otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"Invalid {name.lower()} '{value}': expected a whole number.", title=f"Invalid {name.lower()}") from None
    if not number.is_integer() or not minimum <= number <= maximum:
        raise gr.Error(f"Invalid {name.lower()} {number:g}: expected a whole number from {minimum} to {maximum}.",
                       title=f"Invalid {name.lower()}")
    return int(number)


def _model_references(model_a: str | None, model_b: str | None) -> tuple[str, str]:
    references = []
    for side, reference in (("first", model_a), ("second", model_b)):
        if reference is None or not str(reference).strip():
            raise gr.Error(f"Choose the {side} model: pick a built-in model or type a Hugging Face id or a "
                           "local folder.", title="No model chosen")
        references.append(str(reference).strip())
    if references[0] == references[1]:
        raise gr.Error(f"Both models are '{references[0]}'. Choose two different models to compare.",
                       title="Same model twice")
    return references[0], references[1]


def _load_models(references: tuple[str, str], progress: ProgressTracker | None) -> dict[str, Any]:
    vaes = {}
    for reference in references:
        if progress is not None:
            progress(0.0, desc=f"Loading {reference}")
        try:
            vaes[reference] = models.load_vae(reference)
        except models.ModelLoadError as error:
            raise gr.Error(str(error), title=f"Could not load the model '{reference}'") from error
    return vaes


def _display_labels(references: Sequence[str], max_length: int = 40) -> dict[str, str]:
    """Shorten long references (such as absolute folder paths) for captions, keeping their ends."""
    labels = {reference: reference if len(reference) <= max_length else "..." + reference[-(max_length - 3):]
              for reference in references}
    if len(set(labels.values())) < len(labels):
        return {reference: reference for reference in references}
    return labels


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise gr.Error("The files of this result were removed after an hour to free disk space. "
                       "Run the comparison again.", title="Result expired") from None


def _format_number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"
