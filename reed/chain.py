"""Edit chains: their text and JSON forms, validation, and running one chain over several VAEs.

Text form: steps separated by ``|`` or new lines; a step is ``NAME key=value ...``; ``NAME*N`` repeats
it N times; values are numbers, bare words or double-quoted strings (``\\"`` inside quotes is a quote);
``#`` starts a comment line. Example: ``roundtrip*10 | rotate degrees=5 | jpeg quality=80 | roundtrip*5``.

JSON form: ``{"steps": [{"op": "roundtrip", "repeat": 10}, {"op": "rotate", "params": {"degrees": 5}}]}``
(a bare list of steps is accepted too).

Running: every arm (a VAE) starts from the same source image and gets the same steps with the same
per-step seeds. Between steps each arm has an 8-bit RGB image of the working size, as a user would.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from reed import metrics, models
from reed.edits import EditContext, get_operation
from reed.edits.vae_ops import vae_roundtrip_many

# Longest chain that is run; it bounds the time one request can take.
MAX_STEPS = 500
SEPARATORS = re.compile(r"\||\n")
TOKEN = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|[^\s"]+)\s*|\s*(\S+)\s*')
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Step:
    """One operation with its validated parameters (defaults filled in)."""

    op: str
    params: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.op, tuple(sorted(self.params.items()))))


def _split_steps(text: str) -> list[str]:
    """Split on ``|`` and new lines that are not inside double quotes."""
    parts, current, quoted, escaped = [], [], False, False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\" and quoted:
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            quoted = not quoted
        elif not quoted and SEPARATORS.match(char):
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise ValueError("Invalid chain: a double quote is not closed.")
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip() and not part.strip().startswith("#")]


def _parse_value(raw: str) -> Any:
    if raw.startswith('"'):
        return re.sub(r"\\(.)", r"\1", raw[1:-1])
    if NUMBER.match(raw):
        number = float(raw)
        return int(number) if re.match(r"^[+-]?\d+$", raw) else number
    return raw


def _parse_step(text: str) -> tuple[str, int, dict[str, Any]]:
    head, _, rest = text.partition(" ")
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:\*(\d+))?", head.strip())
    if not match:
        raise ValueError(f"Invalid step '{text}': expected NAME, NAME*N or NAME key=value ...")
    name, repeat = match.group(1), int(match.group(2) or 1)
    params: dict[str, Any] = {}
    position = 0
    rest = rest.strip()
    while position < len(rest):
        token = TOKEN.match(rest, position)
        if token is None or token.group(3) is not None:
            stray = token.group(3) if token else rest[position:]
            raise ValueError(f"Invalid parameter '{stray}' in step '{text}': expected key=value.")
        key, value = token.group(1), token.group(2)
        if key in params:
            raise ValueError(f"Parameter '{key}' is given twice in step '{text}'.")
        params[key] = _parse_value(value)
        position = token.end()
    return name, repeat, params


def _expand(entries: list[tuple[str, int, dict[str, Any]]]) -> list[Step]:
    steps: list[Step] = []
    for name, repeat, params in entries:
        if repeat < 1:
            raise ValueError(f"Invalid repeat count {repeat} for '{name}': must be at least 1.")
        if len(steps) + repeat > MAX_STEPS:
            raise ValueError(f"Chain too long: more than {MAX_STEPS} steps. Use fewer repeats.")
        resolved = get_operation(name).resolve(params)
        steps.extend(Step(name, resolved) for _ in range(repeat))
    if not steps:
        raise ValueError("The chain is empty: give at least one step, for example roundtrip*25.")
    return steps


def parse_chain(text: str) -> list[Step]:
    """Parse and validate the text form. Raises ``ValueError`` naming the first problem found."""
    if not isinstance(text, str):
        raise TypeError(f"A chain in text form must be a string, got {type(text).__name__}.")
    return _expand([_parse_step(part) for part in _split_steps(text)])


def chain_from_json(data: str | list | dict) -> list[Step]:
    """Parse and validate the JSON form (a string, or the decoded list or dict)."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as error:
            raise ValueError(f"Invalid chain JSON: {error}") from error
    if isinstance(data, dict):
        data = data.get("steps")
    if not isinstance(data, list):
        raise ValueError('Invalid chain JSON: expected {"steps": [...]} or a list of steps.')
    entries = []
    for index, item in enumerate(data, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("op"), str):
            raise ValueError(f'Invalid chain JSON: step {index} must be an object with an "op" name.')
        unknown = set(item) - {"op", "params", "repeat"}
        if unknown:
            raise ValueError(f"Invalid chain JSON: step {index} has unknown keys {sorted(unknown)}.")
        params, repeat = item.get("params", {}), item.get("repeat", 1)
        if not isinstance(params, dict) or not isinstance(repeat, int) or isinstance(repeat, bool):
            raise ValueError(f'Invalid chain JSON: step {index} needs "params" as an object and "repeat" as an integer.')
        entries.append((item["op"], repeat, params))
    return _expand(entries)


def load_chain(spec: str) -> list[Step]:
    """Parse a chain given as text or JSON (JSON when it starts with ``{`` or ``[``)."""
    stripped = spec.strip()
    # A tuple, not the string "{[", because the empty string is a substring of every string.
    return chain_from_json(stripped) if stripped[:1] in ("{", "[") else parse_chain(stripped)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_.#,:/+-]+", text) and not NUMBER.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _groups(steps: list[Step]) -> list[tuple[Step, int]]:
    groups: list[tuple[Step, int]] = []
    for step in steps:
        if groups and groups[-1][0] == step:
            groups[-1] = (step, groups[-1][1] + 1)
        else:
            groups.append((step, 1))
    return groups


def _non_default(step: Step) -> dict[str, Any]:
    operation = get_operation(step.op)
    return {name: value for name, value in step.params.items() if operation.param(name).default != value}


def chain_to_text(steps: list[Step]) -> str:
    """Write the text form, folding repeated steps into ``NAME*N`` and leaving out default values."""
    parts = []
    for step, count in _groups(steps):
        head = step.op + (f"*{count}" if count > 1 else "")
        parts.append(" ".join([head] + [f"{k}={_format_value(v)}" for k, v in _non_default(step).items()]))
    return " | ".join(parts)


def chain_to_json(steps: list[Step]) -> dict[str, Any]:
    out = []
    for step, count in _groups(steps):
        entry: dict[str, Any] = {"op": step.op}
        if _non_default(step):
            entry["params"] = _non_default(step)
        if count > 1:
            entry["repeat"] = count
        out.append(entry)
    return {"steps": out}


# -- running -------------------------------------------------------------------------------------------

@dataclass
class ChainResult:
    """Each arm's image after every step, and one metrics row per (arm, step)."""

    image_name: str
    source: np.ndarray
    steps: list[Step]
    arms: list[str]
    images: dict[str, list[np.ndarray]]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def step_seed(seed: int, step: int) -> int:
    """Derive the seed of one step, the same for every arm, so arms differ only in their VAE."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


ProgressCallback = Callable[[int, int, str], None]


def run_chain(source: np.ndarray, steps: list[Step], arms: dict[str, Any] | list[str], seed: int = 0,
              image_name: str = "image", progress: ProgressCallback | None = None,
              with_lpips: bool = True, tile: int | None = None) -> ChainResult:
    """Run ``steps`` on ``source`` (uint8 RGB) once per arm and measure every step.

    ``arms`` maps a display name to a loaded VAE, or lists model references to load. Metrics compare
    each step's image with the source and with that arm's own step-1 output (x1), in [0, 1].
    ``progress(done, total, message)`` is called after every step of every arm. ``tile`` (pixels)
    makes round trips over larger images run in overlapping tiles (``reed.tiling``).
    """
    return run_chains([(image_name, source)], steps, arms, seed, progress, with_lpips, tile)[0]


def run_chains(sources: list[tuple[str, np.ndarray]], steps: list[Step], arms: dict[str, Any] | list[str],
               seed: int = 0, progress: ProgressCallback | None = None, with_lpips: bool = True,
               tile: int | None = None) -> list[ChainResult]:
    """Run the same chain on several named sources, as ``run_chain`` does for one.

    Round trips of sources that share a size go through the VAE as one batch, which is faster than one
    image at a time on most CPUs. Every other operation runs image by image with the seeds it would get
    alone, so each result matches ``run_chain`` on that source up to the float rounding of a batched
    convolution (``tests/test_chain.py`` bounds it).
    """
    if not steps:
        raise ValueError("The chain is empty.")
    if not sources:
        raise ValueError("Give at least one source image.")
    for name, source in sources:
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ValueError(f"The source '{name}' must be a uint8 (H, W, 3) image, "
                             f"got {source.dtype} {source.shape}.")
    vaes = {name: models.load_vae(name) for name in arms} if isinstance(arms, list) else dict(arms)
    if not vaes:
        raise ValueError("Give at least one model to compare.")
    loaded = {name: vae for name, vae in vaes.items() if vae is not None}
    notes = _shape_notes(loaded) if any(get_operation(s.op).uses_vae for s in steps) else []
    notes += [note for note in prepare_steps(steps, loaded) if note not in notes]

    source_units = [metrics.to_unit(source) for _, source in sources]
    current = {arm: [source for _, source in sources] for arm in vaes}
    images = {arm: [[] for _ in sources] for arm in vaes}
    first: dict[tuple[str, int], torch.Tensor] = {}
    rows: list[list[dict[str, Any]]] = [[] for _ in sources]
    batched = len(sources) > 1 and len({source.shape for _, source in sources}) == 1
    total, done = len(steps) * len(vaes) * len(sources), 0
    for index, step in enumerate(steps, start=1):
        operation = get_operation(step.op)
        seed_value = step_seed(seed, index)
        for arm, vae in vaes.items():
            started = time.perf_counter()
            if batched and step.op == "roundtrip" and not step.params:
                outputs = vae_roundtrip_many(vae, current[arm], tile)
            else:
                outputs = []
                for image in current[arm]:
                    context = EditContext(vae=vae, rng=np.random.default_rng(seed_value), seed=seed_value,
                                          step=index, tile=tile)
                    outputs.append(operation.function(image, context, **step.params))
            seconds = (time.perf_counter() - started) / len(sources)

            for number, output in enumerate(outputs):
                image_name, source = sources[number]
                if output.shape != source.shape or output.dtype != np.uint8:
                    raise RuntimeError(f"Operation '{step.op}' returned {output.dtype} {output.shape}, "
                                       f"expected uint8 {source.shape}.")
                current[arm][number] = output
                images[arm][number].append(output)
                unit = metrics.to_unit(output)
                against_source = metrics.compare(unit, source_units[number], with_lpips)
                if (arm, number) in first:
                    against_first = metrics.compare(unit, first[(arm, number)], with_lpips)
                else:
                    # Step 1 is x1 itself: the comparison's result is known without computing it.
                    first[(arm, number)] = unit
                    against_first = metrics.identical(against_source)
                rows[number].append({
                    "image": image_name, "model": arm, "step": index, "op": step.op,
                    **{f"{key}_src": value for key, value in against_source.items()},
                    **{f"{key}_x1": value for key, value in against_first.items()},
                    "seconds": seconds,
                })
                done += 1
                if progress is not None:
                    progress(done, total, f"{arm}: step {index}/{len(steps)} ({step.op})")
    return [ChainResult(name, source, list(steps), list(vaes), {arm: images[arm][number] for arm in vaes},
                        rows[number], list(notes))
            for number, (name, source) in enumerate(sources)]


def prepare_steps(steps: list[Step], vaes: dict[str, Any]) -> list[str]:
    """Run the pre-flight check of every distinct step that has one, and return their warnings.

    A check loads what its operation needs (such as a diffusion pipeline) and raises ``ValueError`` or
    ``reed.models.ModelLoadError`` when the step cannot run, so a chain fails before its first step.
    """
    notes: list[str] = []
    checked: set[Step] = set()
    for step in steps:
        operation = get_operation(step.op)
        if operation.prepare is None or step in checked:
            continue
        checked.add(step)
        for note in operation.prepare(step.params, vaes):
            if note not in notes:
                notes.append(note)
    return notes


def _shape_notes(vaes: dict[str, Any]) -> list[str]:
    shapes = {name: models.latent_shape(vae) for name, vae in vaes.items()}
    if len(set(shapes.values())) <= 1:
        return []
    described = ", ".join(f"{name}: {c} channels, factor {f}" for name, (c, f) in shapes.items())
    return [f"The models have different latent shapes ({described}). Both run, but a diffusion model "
            "could use only one of them, so compare them as separate VAEs rather than drop-in swaps."]
