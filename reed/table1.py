"""An iterative-editing benchmark after Table 1 of the REED-VAE paper (arXiv 2504.18989), for two or more VAEs.

Protocol: every sample is edited ``edits`` times (25) in sequence, each edit taking the previous
output as an 8-bit image. With
a text-guided editor (``ip2p``) odd steps apply the sample's instruction and even steps its reverse
instruction, so a perfect editor would oscillate between two images. Inpainting editors (``inpaint``,
``pbe``) repeat the same prompt or reference and mask at every step. Each VAE (arm) runs the same
chain with the same seed per (sample, step), so arms differ only in their VAE.

Quality is measured at the snapshot steps (1, 5, 15, 25) against x1, the arm's own first edit, on
[0, 1] images: MSE, PSNR, SSIM and LPIPS per sample (averaged over samples), and FID over the set of
samples. LPIPS and FID are ``None`` (null in JSON) when their network weights cannot be loaded.

Files under ``out``: ``config.json`` (the settings, checked when a run resumes),
``samples/NAME/source.png``, ``samples/NAME/MODEL/step-NN.png`` for each snapshot, and
``samples/NAME/sample.json`` (that sample's rows, written last, so its presence marks the sample as
finished), then ``metrics.json``, ``table1.md`` and ``table1.csv`` for all finished samples.

A file of published numbers for the same editor (``load_reference``) adds a second table to ``table1.md``
and a ``reference`` entry to ``metrics.json``. The repository ships no such numbers, only an empty
template, because the paper's Table 1 could not be checked while this module was written.
"""

from __future__ import annotations

import csv
import json
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reed import fid as fid_module
from reed import metrics, report
from reed.chain import Step, run_chain
from reed.edits import get_operation
from reed.edits.diffusion import RECTANGLE
from reed.images import load_image, resize_to_working_size, save_png
from reed.table1_reference import SUMMARY_METRICS, PublishedNumbers, check_reference_fits, load_reference

EDITORS = ("ip2p", "inpaint", "pbe")
TEXT_GUIDED_EDITORS = ("ip2p",)
DEFAULT_EDITS = 25
DEFAULT_SNAPSHOTS = (1, 5, 15, 25)
MANIFEST_NAMES = ("manifest.csv", "manifest.json")
MANIFEST_COLUMNS = ("image", "mask", "instruction", "reverse_instruction", "reference", "name")
# Column headers of the table, with the direction in which each metric is better.
METRIC_HEADERS = {"mse": "MSE ↓", "psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "fid": "FID ↓"}


@dataclass(frozen=True)
class Sample:
    """One benchmark image with what its editor needs. Paths are absolute."""

    name: str
    image: str
    instruction: str | None = None
    reverse_instruction: str | None = None
    mask: str | None = None
    reference: str | None = None


@dataclass
class Table1Config:
    """The settings of one benchmark run; a resumed run must have the same ones."""

    editor: str
    models: list[str]
    op_params: dict[str, Any] = field(default_factory=dict)
    edits: int = DEFAULT_EDITS
    snapshots: tuple[int, ...] = DEFAULT_SNAPSHOTS
    seed: int = 0
    size: int | None = 512
    default_mask: str | None = None

    def __post_init__(self) -> None:
        self.snapshots = tuple(sorted(set(int(step) for step in self.snapshots)))
        if self.editor not in EDITORS:
            raise ValueError(f"Unknown editor '{self.editor}'. Valid editors: {', '.join(EDITORS)}.")
        if len(self.models) < 2 or len(set(self.models)) != len(self.models):
            raise ValueError(f"Give two or more different VAEs to compare, got {self.models}.")
        if self.edits < 1:
            raise ValueError(f"Invalid number of edits {self.edits}: it must be at least 1.")
        if 1 not in self.snapshots:
            raise ValueError(f"The snapshots {list(self.snapshots)} must include step 1, the reference x1.")
        if self.snapshots[-1] > self.edits:
            raise ValueError(f"Snapshot step {self.snapshots[-1]} is beyond the last edit ({self.edits}).")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["snapshots"] = list(self.snapshots)
        return data


# Samples


def _clean(value: Any) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def _resolve_path(value: str | None, base: Path) -> str | None:
    """Make a path relative to the manifest absolute; leave a mask rectangle ``x,y,w,h`` as it is."""
    if value is None:
        return None
    if RECTANGLE.match(value):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _read_manifest_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as file:
            return list(csv.DictReader(file))
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("samples")
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError(f'Invalid manifest {path}: expected a list of objects or {{"samples": [...]}}.')
    return data


def load_manifest(location: str | Path) -> list[Sample]:
    """Read the samples of a manifest file, or of ``manifest.csv`` or ``manifest.json`` in a folder.

    Columns (CSV) or keys (JSON): ``image`` (required), ``mask`` (file or ``x,y,w,h``), ``instruction``,
    ``reverse_instruction``, ``reference`` and ``name`` (default: the image's file stem). Relative paths
    are relative to the manifest. Raises ``ValueError`` naming the row of the first problem.
    """
    path = Path(location).expanduser()
    if path.is_dir():
        found = [path / name for name in MANIFEST_NAMES if (path / name).is_file()]
        if not found:
            raise ValueError(f"No {' or '.join(MANIFEST_NAMES)} in {path}. Write one with the columns "
                             f"{', '.join(MANIFEST_COLUMNS)} (only image is required).")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"Manifest not found: {path}")

    samples: list[Sample] = []
    for index, row in enumerate(_read_manifest_rows(path), start=1):
        if None in row:
            raise ValueError(f"{path}, row {index} has more fields than the header. Quote values that contain "
                             'commas, such as a mask rectangle: "8,8,32,32".')
        unknown = set(row) - set(MANIFEST_COLUMNS)
        if unknown:
            raise ValueError(f"{path}, row {index}: unknown columns {sorted(unknown)}. Valid: {', '.join(MANIFEST_COLUMNS)}.")
        image = _resolve_path(_clean(row.get("image")), path.parent)
        if image is None or not Path(image).is_file():
            raise ValueError(f"{path}, row {index}: image file not found: {row.get('image')!r}.")
        samples.append(Sample(
            name=_clean(row.get("name")) or Path(image).stem,
            image=image,
            instruction=_clean(row.get("instruction")),
            reverse_instruction=_clean(row.get("reverse_instruction")),
            mask=_resolve_path(_clean(row.get("mask")), path.parent),
            reference=_resolve_path(_clean(row.get("reference")), path.parent),
        ))
    _check_unique_names(samples, str(path))
    return samples


def _check_unique_names(samples: Sequence[Sample], source: str) -> None:
    if not samples:
        raise ValueError(f"{source} has no samples.")
    folders = [report.safe_name(sample.name) for sample in samples]
    duplicates = sorted({name for name in folders if folders.count(name) > 1})
    if duplicates:
        raise ValueError(f"{source}: several samples share the name {duplicates[0]!r}; give each a unique name.")


def load_hub_dataset(name: str, split: str, folder: Path, limit: int | None = None,
                     columns: dict[str, str] | None = None) -> list[Sample]:
    """Download a Hugging Face dataset with the ``datasets`` package and save its samples under ``folder``.

    ``columns`` maps manifest fields (``image``, ``mask``, ``instruction``, ``reverse_instruction``,
    ``reference``) to the dataset's column names; by default they are the same. Images are written as
    PNG files, so a resumed run reads the same pixels.
    """
    # NOTE: this path was written against the datasets documentation but never run here, because the
    # hub is unreachable from the development machine and the package is not installed.
    try:
        import datasets  # noqa: PLC0415 (optional dependency)
    except ImportError as error:
        raise ValueError(f"Loading the dataset '{name}' needs the datasets package ({error}); pip install "
                         "datasets, or save the samples to a folder with a manifest.csv.") from error
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as error:  # noqa: BLE001 (datasets raises many types for network and format errors)
        raise ValueError(f"Could not load the dataset '{name}' (split {split}): {error}. Without network "
                         "access, save the samples to a folder with a manifest.csv instead.") from error
    mapping = {field_name: field_name for field_name in MANIFEST_COLUMNS if field_name != "name"}
    mapping.update(columns or {})
    folder.mkdir(parents=True, exist_ok=True)

    samples = []
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        entry: dict[str, str | None] = {}
        for field_name, column in mapping.items():
            value = row.get(column)
            if isinstance(value, Image.Image):
                target = folder / f"{index:05d}-{field_name}.png"
                value.convert("RGB").save(target)
                value = str(target)
            entry[field_name] = _clean(value)
        if entry.get("image") is None:
            raise ValueError(f"Dataset '{name}' row {index} has no image in column '{mapping['image']}'.")
        samples.append(Sample(name=f"{index:05d}", **entry))
    _check_unique_names(samples, f"dataset '{name}'")
    return samples


# Chains


def editor_steps(config: Table1Config, sample: Sample) -> list[Step]:
    """Build the sample's chain of ``config.edits`` steps. Raises ``ValueError`` naming a missing field."""
    operation = get_operation(config.editor)
    params = dict(config.op_params)

    def require(value: str | None, column: str) -> str:
        if value is None:
            raise ValueError(f"Sample '{sample.name}' has no {column}, which the {config.editor} editor needs.")
        return value

    if config.editor in TEXT_GUIDED_EDITORS:
        forward = operation.resolve({**params, "prompt": require(sample.instruction, "instruction")})
        backward = operation.resolve({**params, "prompt": require(sample.reverse_instruction, "reverse_instruction")})
        return [Step(config.editor, forward if step % 2 == 1 else backward) for step in range(1, config.edits + 1)]

    mask = require(sample.mask or config.default_mask, "mask (give one in the manifest or with --mask)")
    if config.editor == "inpaint":
        resolved = operation.resolve({**params, "prompt": require(sample.instruction, "instruction"), "mask": mask})
    else:
        resolved = operation.resolve({**params, "reference": require(sample.reference, "reference"), "mask": mask})
    return [Step(config.editor, resolved)] * config.edits


def sample_seed(seed: int, name: str) -> int:
    """Derive a sample's chain seed from the run seed and its name, so it does not depend on sample order."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode("utf-8"))]).generate_state(1)[0])


# Running


def _write_json(data: Any, path: Path) -> None:
    """Write JSON through a temporary file, so an interrupted run never leaves a half-written file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _check_config(config: Table1Config, out: Path) -> None:
    """Write ``config.json``, or check that a run with finished samples has the same settings."""
    path = out / "config.json"
    current = config.to_json()
    # A run that stopped before finishing any sample (for example, its pipeline could not be loaded) has
    # nothing to resume, so its settings may be replaced.
    finished = any((out / "samples").glob("*/sample.json"))
    if path.is_file() and finished:
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != current:
            changed = sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))
            raise ValueError(f"{out} contains a run with other settings ({', '.join(changed)} differ), so its "
                             "samples cannot be resumed. Choose another --out folder or use the same settings.")
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_json(current, path)


def _model_folders(models: Sequence[str]) -> dict[str, str]:
    folders = {model: report.safe_name(model) for model in models}
    if len(set(folders.values())) != len(folders):
        raise ValueError(f"The model references {list(models)} map to the same folder name; rename a folder.")
    return folders


def _snapshot_path(out: Path, sample: str, model_folder: str, step: int) -> Path:
    return out / "samples" / report.safe_name(sample) / model_folder / f"step-{step:02d}.png"


def _run_sample(sample: Sample, vaes: dict[str, Any], config: Table1Config, out: Path,
                with_lpips: bool) -> dict[str, Any]:
    """Run one sample's chain over every arm, write its snapshots and ``sample.json``, return its record."""
    source = resize_to_working_size(load_image(sample.image).pixels, config.size)
    steps = editor_steps(config, sample)
    result = run_chain(source, steps, vaes, seed=sample_seed(config.seed, sample.name), image_name=sample.name,
                       with_lpips=with_lpips)

    folder = out / "samples" / report.safe_name(sample.name)
    folder.mkdir(parents=True, exist_ok=True)
    save_png(source, folder / "source.png")
    model_folders = _model_folders(config.models)
    for model in config.models:
        (folder / model_folders[model]).mkdir(exist_ok=True)
        for step in config.snapshots:
            save_png(result.images[model][step - 1], _snapshot_path(out, sample.name, model_folders[model], step))
    grid = report.image_grid(source, result.images, steps=list(config.snapshots))
    save_png(grid, folder / "grid.png")

    record = {
        "sample": sample.name,
        "seed": sample_seed(config.seed, sample.name),
        "rows": [row for row in result.rows if row["step"] in config.snapshots],
        "notes": result.notes,
    }
    _write_json(record, folder / "sample.json")
    return record


def _finished_record(sample: Sample, out: Path) -> dict[str, Any] | None:
    path = out / "samples" / report.safe_name(sample.name) / "sample.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values, or None when any is None (a metric that was unavailable for some sample)."""
    if not values or any(value is None for value in values):
        return None
    return float(sum(values) / len(values))


def _fid_per_step(config: Table1Config, samples: Sequence[Sample], out: Path,
                  features: fid_module.FeatureExtractor | None) -> tuple[dict[tuple[str, int], float | None], str | None]:
    """FID between each snapshot step and step 1 over all samples, per model; and why it is missing."""
    if len(samples) < 2:
        return {}, "FID needs at least 2 samples."
    if features is None and fid_module.load_inception() is None:
        return {}, f"FID is not available: {fid_module.fid_unavailable_reason()}."
    model_folders = _model_folders(config.models)
    scores: dict[tuple[str, int], float | None] = {}
    for model in config.models:
        def snapshots(step: int) -> list[np.ndarray]:
            return [load_image(_snapshot_path(out, sample.name, model_folders[model], step)).pixels
                    for sample in samples]

        first = snapshots(1)
        for step in config.snapshots:
            scores[(model, step)] = fid_module.fid(snapshots(step), first, features=features)
    return scores, None


def summarize(config: Table1Config, samples: Sequence[Sample], records: Sequence[dict[str, Any]], out: Path,
              features: fid_module.FeatureExtractor | None = None) -> dict[str, Any]:
    """Average the per-sample metrics per (model, step), add FID, and return the ``metrics.json`` content."""
    fid_scores, fid_note = _fid_per_step(config, samples, out, features)
    rows = [row for record in records for row in record["rows"]]
    summary = []
    for model in config.models:
        for step in config.snapshots:
            selected = [row for row in rows if row["model"] == model and row["step"] == step]
            entry: dict[str, Any] = {"model": model, "step": step, "samples": len(selected)}
            for metric in ("mse", "psnr", "ssim", "lpips"):
                entry[metric] = _mean([row[f"{metric}_x1"] for row in selected])
            entry["fid"] = fid_scores.get((model, step))
            summary.append(entry)

    notes = []
    for record in records:
        notes.extend(note for note in record["notes"] if note not in notes)
    if all(entry["lpips"] is None for entry in summary):
        notes.append(f"LPIPS is not available: {metrics.lpips_unavailable_reason() or 'it was not computed'}.")
    if fid_note:
        notes.append(fid_note)
    return {"config": config.to_json(), "summary": summary, "samples": rows, "notes": notes}


def _format(value: float | None, metric: str) -> str:
    if value is None:
        return "n/a"
    if metric == "mse":
        return f"{value:.2e}"
    if metric in ("psnr", "fid"):
        return f"{value:.2f}"
    return f"{value:.4f}"


def _published_lines(reference: dict[str, Any], steps: Sequence[int], headers: Sequence[str]) -> list[str]:
    """Render published numbers in the layout of this run's table, with one row per model and table step."""
    rows = {(row["model"], row["step"]): row for row in reference["rows"]}
    models = list(dict.fromkeys(row["model"] for row in reference["rows"]))
    lines = [
        f"## Published numbers (source: {reference['source']})",
        "",
        f"These numbers for the {reference['editor']} editor come from {Path(reference['file']).name} and were not "
        "measured by this run. Values keep up to 6 significant digits, and — marks a value that the file does not "
        "give.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for model in models:
        for step in steps:
            row = rows.get((model, step), {})
            values = ["—" if row.get(metric) is None else f"{row[metric]:g}" for metric in SUMMARY_METRICS]
            cells = [model.replace("|", "\\|"), str(step), *values]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_table(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``table1.md`` and ``table1.csv``: one row per model and snapshot step after step 1.

    When ``results`` has a ``reference`` entry (see ``PublishedNumbers.to_json``), ``table1.md`` shows
    those published numbers in a second table with the same columns and steps. ``table1.csv`` contains
    this run's numbers only.
    """
    config = results["config"]
    entries = [entry for entry in results["summary"] if entry["step"] > 1]
    headers = ["VAE", "step", *(METRIC_HEADERS[metric] for metric in SUMMARY_METRICS)]

    lines = [
        f"# Iterative editing: {config['editor']}, {config['edits']} edits",
        "",
        f"Metrics against x1 (each VAE's own first edit), averaged over {len(set(r['image'] for r in results['samples']))} "
        "samples; FID is over the set of samples. n/a: the metric's network weights could not be loaded.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for entry in entries:
        cells = [entry["model"], str(entry["step"]), *(_format(entry[metric], metric) for metric in SUMMARY_METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {note}" for note in results["notes"]]
    if results.get("reference") is not None:
        steps = [step for step in config["snapshots"] if step > 1]
        lines += ["", *_published_lines(results["reference"], steps, headers)]
    markdown = out / "table1.md"
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")

    table = out / "table1.csv"
    with table.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["model", "step", *SUMMARY_METRICS, "samples"])
        for entry in entries:
            writer.writerow([entry["model"], entry["step"], *("" if entry[m] is None else entry[m] for m in SUMMARY_METRICS),
                             entry["samples"]])
    return markdown, table


ProgressCallback = Callable[[int, int, str], None]


def run_table1(samples: Sequence[Sample], vaes: dict[str, Any], config: Table1Config, out: str | Path,
               with_lpips: bool = True, progress: ProgressCallback | None = None,
               features: fid_module.FeatureExtractor | None = None,
               reference: str | Path | PublishedNumbers | None = None) -> dict[str, Any]:
    """Run the benchmark, skipping samples finished by an earlier run into ``out``, and write every file.

    ``vaes`` maps each name in ``config.models`` to a loaded VAE. ``progress(done, total, message)`` is
    called after each sample. ``reference`` is a file of published numbers for the same editor (see
    ``load_reference``), or the numbers already loaded. They are checked before any sample runs, shown
    as a second table in ``table1.md`` and stored under ``reference`` in ``metrics.json``. They do not
    affect the edits, so a resumed run may give another file. Returns the content of ``metrics.json``
    plus ``skipped``, the names of the samples that an earlier run had finished.
    """
    out = Path(out)
    if isinstance(reference, PublishedNumbers):
        check_reference_fits(reference, config)
    elif reference is not None:
        reference = load_reference(reference, config)
    if list(vaes) != list(config.models):
        raise ValueError(f"The VAEs {list(vaes)} do not match the configured models {config.models}.")
    _check_unique_names(samples, "the sample list")
    for sample in samples:
        editor_steps(config, sample)  # reject a sample with a missing field before any model runs
    _check_config(config, out)

    records, skipped = [], []
    for index, sample in enumerate(samples, start=1):
        record = _finished_record(sample, out)
        if record is not None:
            skipped.append(sample.name)
            status = "skipped, finished by an earlier run"
        else:
            record = _run_sample(sample, vaes, config, out, with_lpips)
            status = "done"
        records.append(record)
        if progress is not None:
            progress(index, len(samples), f"{sample.name}: {status}")

    results = summarize(config, samples, records, out, features)
    if reference is not None:
        results["reference"] = reference.to_json()
    _write_json(results, out / "metrics.json")
    write_table(results, out)
    return {**results, "skipped": skipped}
