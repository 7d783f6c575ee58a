"""The Gradio layout of the REED comparison app and the wiring of its events to ``demo.handlers``.

The functions prefixed with ``_`` only convert between Gradio components and the handlers' plain values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd

from demo import handlers
from reed import report
from reed.models import BUILTIN_MODELS, DEFAULT_ARMS

# Runs that compute at the same time. A comparison already uses every CPU core through torch, so a
# second concurrent run would only make both slower.
RUN_CONCURRENCY = 1
# Requests that may wait in the queue. Gradio rejects further requests with a "queue is full" error.
QUEUE_MAX_SIZE = 16
# Gradio's own copies of served files: checked every 30 minutes, removed after an hour.
GRADIO_CACHE_CLEANUP = (1800, 3600)

# Text boxes in the chain builder: enough for the operation with the most parameters.
PARAM_SLOTS = max(len(handlers.parameter_fields(name)) for name in handlers.operation_names())
IMAGE_HEIGHT = 320

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="amber")
CSS = """
.intro p { max-width: 72em; }
.step-caption { font-size: 1.1em; }
.hint { font-size: 0.9em; opacity: 0.8; }
"""

INTRO = """
# REED-VAE: do your photos survive repeated editing?

Every edit made with a latent-diffusion model (Stable Diffusion, FLUX and similar) turns the image into
latents with the model's VAE encoder and back into pixels with its decoder. One such **round trip** loses
a little; after ten or twenty edits, colours drift, textures smear and artefacts build up.
**REED-VAE** (Almog, Shamir and Fried, Eurographics 2025) keeps the encoder as it is and fine-tunes only
the decoder, with a loss measured over several encode/decode cycles, so that images stay close to the
original after many round trips. A REED decoder is a drop-in replacement: the latents do not change.

This demo runs your photo through an edit chain twice, once with each model, saving an 8-bit image after
every step as an editor would. The step slider shows both results at any step; the curves show how far
each model drifts from the source photo (dashed) and from its own first round trip, x1 (solid).
The built-in **reed-mini** models are small VAEs trained on a few sample photos so that the demo runs on a
CPU; type a Hugging Face id or a local folder to compare other VAEs.
"""

CHAIN_SYNTAX = ("Steps are separated by `|` or new lines. A step is `NAME` or `NAME key=value ...`, and "
                "`NAME*N` repeats it N times. Example: `roundtrip*5 | rotate degrees=3 | jpeg quality=85`. "
                "Build steps below or type them.")
DIFFUSION_INPUTS_HELP = ("Choose inpaint or pbe under *Operation* first. Paint over the region to change and "
                         "press the button: the mask is saved as a file and its path goes into the mask box "
                         "(a rectangle x,y,w,h in pixels works too). For pbe, upload the example object's image "
                         "the same way. Diffusion edits need their pipeline's weights; an operation marked "
                         "unavailable can still run with model= set to a local pipeline folder.")
MODEL_INFO = ("A built-in model, a Hugging Face id (for example stabilityai/sd-vae-ft-mse) or a local "
              "folder in the diffusers layout.")
RESULTS_HELP = """
**How to read the results.** *Side by side* shows the source and both models' images after the chosen
step. *Before / after* lets you drag a divider between the source and each model's image. *Differences*
shows |image - source| and |image - x1|, multiplied so that small drifts become visible: black means
unchanged. PSNR (higher is better, in dB) and SSIM (1 means identical) are computed against the source
and against x1, the model's own output after step 1.
"""


# Adapters between components and handlers


def _preview(photo_path: str | None, working_size: str) -> tuple[Any, str]:
    return handlers.preview_image(photo_path, working_size)


def _pick_example(event: gr.SelectData) -> str:
    return handlers.example_photo(event.index)


def _operation_fields(op_name: str) -> list[Any]:
    """Show one text box per parameter of the chosen operation, labelled and filled with its default."""
    fields = handlers.parameter_fields(op_name)
    updates: list[Any] = [handlers.operation_help(op_name)]
    for slot in range(PARAM_SLOTS):
        if slot < len(fields):
            field = fields[slot]
            updates.append(gr.Textbox(label=field.name, value=field.value, info=field.info, visible=True))
        else:
            updates.append(gr.Textbox(label="", value="", info=None, visible=False))
    return updates


def _add_step(chain_text: str, op_name: str, repeat: float, *values: str) -> str:
    return handlers.add_step(chain_text, op_name, repeat, values)


def _fill_parameter(op_name: str, param_name: str, make_value: Callable[[], str]) -> list[Any]:
    """Put ``make_value()`` into the builder's box for ``param_name``, leaving the other boxes unchanged."""
    index = handlers.parameter_index(op_name, param_name)
    if index is None:
        raise gr.Error(f"The operation '{op_name}' has no {param_name}. Choose inpaint or pbe in the builder "
                       "first.", title=f"No {param_name} parameter")
    value = make_value()
    return [gr.Textbox(value=value) if slot == index else gr.skip() for slot in range(PARAM_SLOTS)]


def _use_mask(op_name: str, editor_value: dict[str, Any] | None) -> list[Any]:
    return _fill_parameter(op_name, "mask", lambda: handlers.save_mask(editor_value))


def _use_reference(op_name: str, reference_path: str | None) -> list[Any]:
    return _fill_parameter(op_name, "reference", lambda: handlers.save_reference(reference_path))


def _mask_background(preview: Any) -> dict[str, Any]:
    """Show the photo as the models see it under the mask brush, with no strokes."""
    return {"background": preview, "layers": [], "composite": preview}


def _step_outputs(record: handlers.RunRecord, view: handlers.StepView) -> list[Any]:
    """Return the values of the step components, in the order of ``step_components`` in ``build_demo``."""
    first, second = record.models
    label_first, label_second = record.labels[first], record.labels[second]
    step = f"step {view.step}"
    return [
        view.caption,
        gr.Image(value=view.source, label="source"),
        gr.Image(value=view.images[first], label=f"{label_first}, {step}"),
        gr.Image(value=view.images[second], label=f"{label_second}, {step}"),
        gr.ImageSlider(value=(view.source, view.images[first]), label=f"source | {label_first}, {step}"),
        gr.ImageSlider(value=(view.source, view.images[second]), label=f"source | {label_second}, {step}"),
        gr.Image(value=view.differences[first], label=f"{label_first}, {step}: differences"),
        gr.Image(value=view.differences[second], label=f"{label_second}, {step}: differences"),
        view.metrics_markdown,
    ]


def _run(photo_path: str | None, chain_text: str, model_a: str, model_b: str, working_size: str,
         seed: float, progress: gr.Progress = gr.Progress()) -> list[Any]:
    result = handlers.run_comparison(photo_path, chain_text, model_a, model_b, working_size, seed, progress)
    record = result.record
    notes = "\n".join(f"- {note}" for note in result.notes)
    table = pd.DataFrame(result.table_rows, columns=result.table_headers)
    return [
        record,
        notes,
        _step_slider(record.step_count),
        *_step_outputs(record, result.view),
        result.figure,
        result.grid,
        table,
        [str(path) for path in result.files],
    ]


def _step_slider(step_count: int) -> gr.Slider:
    if step_count == 1:
        # A Gradio slider needs maximum > minimum, so a one-step chain gets a fixed slider.
        return gr.Slider(minimum=1, maximum=2, value=1, interactive=False)
    return gr.Slider(minimum=1, maximum=step_count, value=step_count, interactive=True)


def _show_step(record: handlers.RunRecord | None, step: float, gain: float) -> list[Any]:
    if record is None:
        return [gr.skip()] * 9
    return _step_outputs(record, handlers.show_step(record, step, gain))


# Layout and wiring


def build_demo() -> gr.Blocks:
    """Build the app: inputs (photo, chain, models) at the top, results below."""
    operation_names = handlers.operation_names()
    operation_choices = handlers.operation_choices()
    examples = handlers.example_photos()

    # Analytics are off because the app must work offline and sends nothing to other hosts.
    with gr.Blocks(title="REED-VAE: edit chains", delete_cache=GRADIO_CACHE_CLEANUP,
                   analytics_enabled=False) as demo:
        gr.Markdown(INTRO, elem_classes="intro")
        run_state = gr.State(None)

        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                gr.Markdown("### 1. Photo")
                photo_file = gr.File(label="Upload a photo", file_types=["image"], height=110)
                example_gallery = gr.Gallery(
                    value=[(str(path), name) for name, path in examples.items()],
                    label="Or click an example photo (none was used for training)", columns=4, rows=1,
                    height=170, allow_preview=False, object_fit="cover", format="png")
                working_size = gr.Radio(
                    [("128 px", "128"), ("256 px", "256"), ("512 px", "512"),
                     (f"own size (up to {handlers.ORIGINAL_MAX_SIDE} px)", "original")],
                    value=handlers.DEFAULT_WORKING_SIZE, label="Working size",
                    info="Shorter side of the image the models see. Larger sizes take longer.")
                photo_preview = gr.Image(label="What the models see", interactive=False, format="png",
                                         height=240)
                photo_notes = gr.Markdown()

            with gr.Column(scale=3):
                gr.Markdown("### 2. Edit chain")
                chain_box = gr.Textbox(value=handlers.DEFAULT_CHAIN, label="Edit chain", lines=3)
                gr.Markdown(CHAIN_SYNTAX, elem_classes="hint")
                with gr.Row():
                    preset_buttons = {name: gr.Button(f"Preset: {name}", size="sm") for name in handlers.PRESETS}
                with gr.Accordion("Build a step", open=True):
                    with gr.Row():
                        op_dropdown = gr.Dropdown(operation_choices, value=operation_names[0], label="Operation",
                                                  scale=3)
                        repeat_box = gr.Number(value=1, label="Repeat", precision=0, minimum=1,
                                               maximum=handlers.MAX_APP_STEPS, scale=1)
                    op_help = gr.Markdown(handlers.operation_help(operation_names[0]))
                    with gr.Row():
                        param_boxes = [gr.Textbox(visible=False, min_width=140) for _ in range(PARAM_SLOTS)]
                    add_button = gr.Button("Add step to the chain", size="sm")
                with gr.Accordion("Mask and reference image (for inpaint and pbe)", open=False):
                    gr.Markdown(DIFFUSION_INPUTS_HELP, elem_classes="hint")
                    with gr.Row():
                        mask_editor = gr.ImageEditor(
                            label="Paint the region to repaint", type="numpy", height=IMAGE_HEIGHT,
                            brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"))
                        reference_image = gr.Image(label="Reference image (pbe)", type="filepath",
                                                   sources=["upload"], height=IMAGE_HEIGHT)
                    with gr.Row():
                        mask_button = gr.Button("Use the painted region as the mask", size="sm")
                        reference_button = gr.Button("Use this image as the reference", size="sm")

                gr.Markdown("### 3. Models")
                with gr.Row():
                    model_a = gr.Dropdown(list(BUILTIN_MODELS), value=DEFAULT_ARMS[0], allow_custom_value=True,
                                          label="Model A (for example a standard VAE)", info=MODEL_INFO)
                    model_b = gr.Dropdown(list(BUILTIN_MODELS), value=DEFAULT_ARMS[1], allow_custom_value=True,
                                          label="Model B (for example its REED decoder)", info=MODEL_INFO)
                with gr.Row():
                    seed_box = gr.Number(value=0, label="Seed", precision=0, minimum=0, maximum=handlers.MAX_SEED,
                                         info="Seeds the random edits (such as noise); both models get the same.")
                    run_button = gr.Button("Run the comparison", variant="primary", scale=2)

        gr.Markdown("## Results")
        run_notes = gr.Markdown("Results appear here after you press **Run the comparison**.")
        with gr.Row(equal_height=True):
            step_caption = gr.Markdown(elem_classes="step-caption")
            step_slider = gr.Slider(minimum=1, maximum=2, value=1, step=1, label="Step", interactive=False,
                                    scale=3)
        with gr.Tabs():
            with gr.Tab("Side by side"):
                with gr.Row():
                    source_image = gr.Image(label="source", format="png", interactive=False, height=IMAGE_HEIGHT)
                    image_a = gr.Image(label="model A", format="png", interactive=False, height=IMAGE_HEIGHT)
                    image_b = gr.Image(label="model B", format="png", interactive=False, height=IMAGE_HEIGHT)
            with gr.Tab("Before / after"):
                with gr.Row():
                    slider_a = gr.ImageSlider(label="source | model A", format="png", interactive=False,
                                              height=IMAGE_HEIGHT)
                    slider_b = gr.ImageSlider(label="source | model B", format="png", interactive=False,
                                              height=IMAGE_HEIGHT)
            with gr.Tab("Differences"):
                gain_slider = gr.Slider(minimum=1, maximum=32, value=handlers.DEFAULT_GAIN, step=1,
                                        label="Amplification", info="Multiplies |difference| before display.")
                # The difference images carry their own captions, which a Gradio label would cover.
                with gr.Row():
                    difference_a = gr.Image(label="model A: differences", show_label=False, format="png",
                                            interactive=False)
                    difference_b = gr.Image(label="model B: differences", show_label=False, format="png",
                                            interactive=False)
        step_metrics = gr.Markdown()
        gr.Markdown(RESULTS_HELP)

        with gr.Tabs():
            with gr.Tab("Quality curves"):
                curves_plot = gr.Plot(label="PSNR and SSIM over the chain", format="png")
            with gr.Tab("Grid"):
                grid_steps = ", ".join(str(step) for step in report.DEFAULT_GRID_STEPS)
                gr.Markdown(f"The source, then steps {grid_steps} (those the chain has) and the last step; "
                            "one row per model.")
                grid_image = gr.Image(label="grid", show_label=False, format="png", interactive=False)
            with gr.Tab("Metrics table and files"):
                metrics_table = gr.Dataframe(label="One row per model and step", interactive=False,
                                             wrap=False, max_height=400)
                result_files = gr.File(label="Download: metrics (CSV, JSON), grid, curves, everything (zip)",
                                       file_count="multiple", interactive=False)

        # Events
        step_components = [step_caption, source_image, image_a, image_b, slider_a, slider_b,
                           difference_a, difference_b, step_metrics]
        light = {"concurrency_limit": None, "show_progress": "minimal"}

        example_gallery.select(_pick_example, None, photo_file, api_visibility="private", **light)
        photo_file.change(_preview, [photo_file, working_size], [photo_preview, photo_notes],
                          api_name="preview", **light)
        working_size.change(_preview, [photo_file, working_size], [photo_preview, photo_notes],
                            api_visibility="private", **light)

        op_dropdown.change(_operation_fields, op_dropdown, [op_help, *param_boxes], api_visibility="private",
                           **light)
        demo.load(_operation_fields, op_dropdown, [op_help, *param_boxes], api_visibility="private", **light)
        add_button.click(_add_step, [chain_box, op_dropdown, repeat_box, *param_boxes], chain_box,
                         api_name="add_step", **light)
        photo_preview.change(_mask_background, photo_preview, mask_editor, api_visibility="private", **light)
        mask_button.click(_use_mask, [op_dropdown, mask_editor], param_boxes, api_visibility="private", **light)
        reference_button.click(_use_reference, [op_dropdown, reference_image], param_boxes,
                               api_visibility="private", **light)
        for name, button in preset_buttons.items():
            button.click(functools.partial(handlers.preset_chain, name), None, chain_box,
                         api_visibility="private", **light)

        run_button.click(
            _run, [photo_file, chain_box, model_a, model_b, working_size, seed_box],
            [run_state, run_notes, step_slider, *step_components, curves_plot, grid_image, metrics_table,
             result_files],
            api_name="run", concurrency_limit=RUN_CONCURRENCY, concurrency_id="comparison",
            show_progress_on=[run_notes])
        step_slider.change(_show_step, [run_state, step_slider, gain_slider], step_components,
                           api_name="show_step", trigger_mode="always_last", **light)
        gain_slider.change(_show_step, [run_state, step_slider, gain_slider], step_components,
                           api_visibility="private", trigger_mode="always_last", **light)

    demo.queue(default_concurrency_limit=RUN_CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    return demo


def launch_options() -> dict[str, Any]:
    """Return the keyword arguments of ``launch`` that style the app (Gradio 6 takes them there)."""
    return {"theme": THEME, "css": CSS}
