"""Published numbers for the Table 1 benchmark: a small JSON or CSV file read and checked before a run.

The repository ships no published numbers. A user copies them from a paper into the template
``benchmarks/table1_reference_template.json``, and ``reed.table1.write_table`` prints them beside the run's
own table, with their source.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from reed.table1 import Table1Config

SUMMARY_METRICS = ("mse", "psnr", "ssim", "lpips", "fid")  # the columns of the run's table and of these files


REFERENCE_FIELDS = ("model", "step", *SUMMARY_METRICS)
# A CSV file repeats its source and editor on every row, so it stays plain CSV that any spreadsheet reads.
REFERENCE_CSV_COLUMNS = ("source", "editor", *REFERENCE_FIELDS)
# benchmarks/table1_reference_template.json starts its source with this text, so an unfilled copy is rejected.
REFERENCE_PLACEHOLDER = "REPLACE"


@dataclass(frozen=True)
class ReferenceRow:
    """One published row: a VAE at one edit step, with None for each metric that the source does not give."""

    model: str
    step: int
    values: dict[str, float | None]


@dataclass(frozen=True)
class PublishedNumbers:
    """Published Table 1 numbers for one editor, as read and checked by ``load_reference``."""

    file: str
    source: str
    editor: str
    rows: tuple[ReferenceRow, ...]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "source": self.source, "editor": self.editor,
                "rows": [{"model": row.model, "step": row.step, **row.values} for row in self.rows]}


def table_steps(config: Table1Config) -> list[int]:
    """Return the snapshot steps that the table shows, which are all but step 1 (the reference x1)."""
    return [step for step in config.snapshots if step > 1]


def _read_reference_json(text: str) -> tuple[Any, Any, list[tuple[str, dict[str, Any]]]]:
    """Return the source, editor and (location, row) pairs of a JSON file, with values as JSON typed them."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError('expected an object {"source": ..., "editor": ..., "rows": [...]}')
    unknown = set(data) - {"source", "editor", "rows"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}. Valid keys are source, editor and rows")
    rows = data.get("rows")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError('"rows" must be a list of objects')
    return data.get("source"), data.get("editor"), [(f"rows[{index}]", row) for index, row in enumerate(rows)]


def _parse_cell(text: str | None, column: str, location: str) -> int | float | None:
    """Convert a CSV cell of ``step`` or a metric column to a number, or to None when the cell is empty."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return int(text) if column == "step" else float(text)
    except ValueError:
        kind = "an integer" if column == "step" else "a number, or empty when the source gives none"
        raise ValueError(f"{location}: {column} {text!r} is not {kind}") from None


def _read_reference_csv(text: str) -> tuple[Any, Any, list[tuple[str, dict[str, Any]]]]:
    """Return the source, editor and (location, row) pairs of a CSV file, with numbers already converted."""
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    unknown = set(header) - set(REFERENCE_CSV_COLUMNS)
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}. Valid columns are {', '.join(REFERENCE_CSV_COLUMNS)}")
    missing = [column for column in ("source", "editor", "model", "step") if column not in header]
    if missing:
        raise ValueError(f"missing columns {missing}. The columns source, editor, model and step are required")

    sources, editors, rows = set(), set(), []
    for row in reader:
        location = f"line {reader.line_num}"
        if None in row:
            raise ValueError(f"{location} has more fields than the header. Quote values that contain commas")
        sources.add((row["source"] or "").strip())
        editors.add((row["editor"] or "").strip())
        parsed: dict[str, Any] = {"model": (row["model"] or "").strip()}
        for column in ("step", *SUMMARY_METRICS):
            if column in row:
                parsed[column] = _parse_cell(row[column], column, location)
        rows.append((location, parsed))
    if len(sources) > 1 or len(editors) > 1:
        raise ValueError("the source and editor columns must have the same value on every row")
    return next(iter(sources), None) or None, next(iter(editors), None) or None, rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _reference_row(location: str, row: dict[str, Any], steps: Sequence[int]) -> ReferenceRow:
    unknown = set(row) - set(REFERENCE_FIELDS)
    if unknown:
        raise ValueError(f"{location}: unknown fields {sorted(unknown)}. "
                         f"Valid fields are {', '.join(REFERENCE_FIELDS)}")
    model = row.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"{location}: model must be a non-empty name such as \"REED-VAE\"")
    step = row.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"{location}: step {step!r} is not an integer")
    if step not in steps:
        raise ValueError(f"{location}: step {step} is not a step of this run's table {list(steps)}. "
                         "Change the row's step, or run with --snapshots that include it")
    values: dict[str, float | None] = {}
    for metric in SUMMARY_METRICS:
        value = row.get(metric)
        if value is not None and (not _is_number(value) or not math.isfinite(value)):
            raise ValueError(f"{location}: {metric} {value!r} is not a finite number (use null or an empty cell "
                             "for a value that the source does not give)")
        values[metric] = None if value is None else float(value)
    return ReferenceRow(model=model.strip(), step=step, values=values)


def _parse_reference(text: str, suffix: str, config: Table1Config, file: str) -> PublishedNumbers:
    source, editor, raw_rows = _read_reference_json(text) if suffix == ".json" else _read_reference_csv(text)
    if not isinstance(source, str) or not source.strip():
        raise ValueError("missing source, which states where the numbers come from, such as the paper, table and rows")
    if source.strip().startswith(REFERENCE_PLACEHOLDER):
        raise ValueError("the source still contains the template's placeholder. Replace it with where the "
                         "numbers come from")
    if not isinstance(editor, str) or not editor.strip():
        from reed.table1 import EDITORS  # imported late: reed.table1 imports this module

        raise ValueError(f"missing editor, which names the editor whose numbers these are ({', '.join(EDITORS)})")
    if editor != config.editor:
        raise ValueError(f"the file's editor is {editor!r} but this run uses {config.editor!r}. Give the numbers "
                         f"published for {config.editor}, or run with --editor {editor}")

    rows = tuple(_reference_row(location, row, table_steps(config)) for location, row in raw_rows)
    keys = [(row.model, row.step) for row in rows]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"model {duplicates[0][0]!r} has more than one row for step {duplicates[0][1]}")
    if not any(value is not None for row in rows for value in row.values.values()):
        raise ValueError("the file contains no numbers. Copy them from the source into the metric fields")
    return PublishedNumbers(file=file, source=" ".join(source.split()), editor=editor, rows=rows)


def load_reference(location: str | Path, config: Table1Config) -> PublishedNumbers:
    """Read and check a file of published numbers for ``config``'s editor and table steps.

    JSON: ``{"source": ..., "editor": ..., "rows": [{"model": ..., "step": ..., "psnr": ..., ...}]}``.
    CSV: the columns source, editor, model and step, plus any of mse, psnr, ssim, lpips and fid, with the
    same source and editor on every row. A metric that the source does not give is null (JSON), an empty
    cell or an absent column (CSV). Raises ``FileNotFoundError`` for a missing file and ``ValueError``,
    naming the file and the problem, for any other fault.
    """
    path = Path(location).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Published numbers file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"Invalid published numbers file {path}: the name must end in .csv or .json.")
    try:
        # utf-8-sig also reads the byte-order mark that spreadsheet programs write at the start of a CSV file.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"Could not read the published numbers file {path}: {error}") from error
    try:
        return _parse_reference(text, suffix, config, str(path))
    except ValueError as error:
        raise ValueError(f"Invalid published numbers file {path}: {error}.") from None


def check_reference_fits(reference: PublishedNumbers, config: Table1Config) -> None:
    """Check that numbers loaded for another config have this run's editor and table steps."""
    if reference.editor != config.editor:
        raise ValueError(f"The published numbers in {reference.file} are for the {reference.editor} editor, "
                         f"but this run uses {config.editor}.")
    extra = sorted({row.step for row in reference.rows} - set(table_steps(config)))
    if extra:
        raise ValueError(f"The published numbers in {reference.file} have steps {extra}, which this run's "
                         f"table {table_steps(config)} does not show.")
