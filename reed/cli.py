"""The ``python -m reed`` command line: train, ladder, chain, table1, photos, export, models, ops."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm


def _train(args: argparse.Namespace) -> int:
    from reed.config import TrainConfig
    from reed.launch import requested_cpu_processes, run_cpu_processes
    from reed.train import train

    count, note = requested_cpu_processes()
    if note:
        print(note, file=sys.stderr, flush=True)
    if count:
        return run_cpu_processes(count, args.argv)
    overrides = {}
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.steps:
        overrides["steps"] = args.steps
    if args.random_init:
        overrides["random_init"] = True
    config = TrainConfig.from_yaml(args.config, overrides)
    train(config, resume=not args.no_resume, max_steps=args.max_steps)
    return 0


def _prepare_sources(inputs: list[str], size: int | None) -> list[tuple[str, "np.ndarray", list[str]]]:
    """Load every image named directly or found in a named folder, at the working size."""
    from reed.data import folder_images
    from reed.images import MAX_WORKING_SIDE, load_image, resize_to_working_size

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        paths.extend(folder_images(path) if path.is_dir() else [path])
    sources = []
    for path in paths:
        loaded = load_image(path, max_side=MAX_WORKING_SIDE)
        sources.append((path.stem, resize_to_working_size(loaded.pixels, size), loaded.notes))
    names = [name for name, _, _ in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"Two input images share a file name stem ({names}); rename one so outputs do not collide.")
    return sources


@dataclass(frozen=True)
class EngineOptions:
    """Speed settings of ``ladder`` and ``chain``: none changes what is computed beyond float rounding."""

    dtype: str = "float32"
    tile: int | None = None
    batch: int = 1
    threads: int | None = None


def _engine_options(args: argparse.Namespace) -> EngineOptions:
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}.")
    return EngineOptions(args.dtype, args.tile, args.batch, args.threads)


def _batches(sources: list, size: int) -> list[list]:
    """Group sources of one shape into batches of at most ``size``, keeping their order within a shape."""
    by_shape: dict[tuple, list] = {}
    for source in sources:
        by_shape.setdefault(source[1].shape, []).append(source)
    return [group[start:start + size] for group in by_shape.values() for start in range(0, len(group), size)]


def _run_and_report(sources, steps, model_names: list[str], out: Path, seed: int,
                    options: EngineOptions = EngineOptions()) -> list[dict]:
    import torch

    from reed import report
    from reed.chain import run_chains
    from reed.images import save_png
    from reed.models import load_vae

    if options.threads is not None:
        torch.set_num_threads(options.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[options.dtype]
    vaes = {name: load_vae(name, dtype=dtype) for name in model_names}
    # Every model loaded and every input was read, so this run will write results. Clear an earlier run's.
    if report.remove_previous_run(out):
        print(f"Replacing the results of an earlier run in {out}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for batch in _batches(sources, options.batch):
        for name, _, notes in batch:
            for note in notes:
                print(f"{name}: {note}")
        height, width = batch[0][1].shape[:2]
        label = ", ".join(name for name, _, _ in batch) + f" ({width}x{height})"
        with tqdm(total=len(steps) * len(vaes) * len(batch), desc=label, dynamic_ncols=True) as bar:
            results = run_chains([(name, pixels) for name, pixels, _ in batch], steps, vaes, seed=seed,
                                 progress=lambda done, total, message: bar.update(done - bar.n),
                                 tile=options.tile)
        for result in results:
            for note in result.notes:
                print(f"{result.image_name}: {note}")
            rows.extend(result.rows)
            report.save_images(result.images, out, result.image_name, [step.op for step in steps])
            grid = report.image_grid(result.source, result.images)
            save_png(grid, out / f"grid-{report.safe_name(result.image_name)}.png")
    report.write_metrics(rows, out)
    report.save_figure(report.plot_curves(rows), out / "curves.png")
    _print_summary(rows, len(steps))
    print(f"Wrote {out / 'metrics.json'}, metrics.csv, curves.png, grids and per-step images under {out}")
    return rows


def _print_summary(rows: list[dict], last: int) -> None:
    """Print, per model, the mean over images of the step-1 and last-step figures."""
    models = list(dict.fromkeys(row["model"] for row in rows))
    print(f"\n{'model':<28} {'PSNR src @1':>12} {'SSIM src @1':>12} {f'PSNR x1 @{last}':>13} {f'SSIM x1 @{last}':>13}")
    for model in models:
        first = [row for row in rows if row["model"] == model and row["step"] == 1]
        final = [row for row in rows if row["model"] == model and row["step"] == last]

        def mean(selected, key):
            return sum(row[key] for row in selected) / len(selected)

        print(f"{model:<28} {mean(first, 'psnr_src'):>12.2f} {mean(first, 'ssim_src'):>12.4f} "
              f"{mean(final, 'psnr_x1'):>13.2f} {mean(final, 'ssim_x1'):>13.4f}")


def _ladder(args: argparse.Namespace) -> int:
    from reed.chain import parse_chain

    if not 1 <= args.cycles <= 500:
        raise ValueError(f"--cycles must be between 1 and 500, got {args.cycles}.")
    steps = parse_chain(f"roundtrip*{args.cycles}")
    _run_and_report(_prepare_sources(args.inputs, args.size), steps, _split_models(args.models), Path(args.out),
                    args.seed, _engine_options(args))
    return 0


def _chain(args: argparse.Namespace) -> int:
    from reed.chain import chain_to_text, load_chain

    spec = Path(args.chain).read_text(encoding="utf-8") if args.chain.endswith((".json", ".txt")) else args.chain
    steps = load_chain(spec)
    print(f"Chain ({len(steps)} steps): {chain_to_text(steps)}")
    _run_and_report(_prepare_sources(args.inputs, args.size), steps, _split_models(args.models), Path(args.out),
                    args.seed, _engine_options(args))
    return 0


def _table1(args: argparse.Namespace) -> int:
    from reed import table1
    from reed.models import load_vae

    if (args.samples is None) == (args.dataset is None):
        raise ValueError("Give either a samples folder or manifest file, or --dataset NAME, but not both.")
    snapshots = tuple(int(step) for step in args.snapshots.split(",") if step.strip())
    op_params = {"steps": args.steps_per_edit}
    for key, value in (("model", args.model), ("guidance", args.guidance), ("image_guidance", args.image_guidance)):
        if value is not None:
            op_params[key] = value
    if args.keep_unmasked:
        op_params["keep_unmasked"] = True
    config = table1.Table1Config(editor=args.editor, models=_split_models(args.models), op_params=op_params,
                                 edits=args.edits, snapshots=snapshots, seed=args.seed, size=args.size,
                                 default_mask=args.mask)
    # Check the published numbers before any model loads or sample runs, so a bad file costs no editing time.
    reference = table1.load_reference(args.reference, config) if args.reference else None
    out = Path(args.out)
    if args.samples is not None:
        samples = table1.load_manifest(args.samples)[:args.limit]
    else:
        samples = table1.load_hub_dataset(args.dataset, args.split, out / "inputs", limit=args.limit)

    vaes = {name: load_vae(name) for name in config.models}
    print(f"table1: {len(samples)} samples, editor {config.editor}, {config.edits} edits, snapshots "
          f"{list(config.snapshots)}, models {', '.join(config.models)}")
    with tqdm(total=len(samples), desc="samples", dynamic_ncols=True) as bar:
        def show_progress(done: int, total: int, message: str) -> None:
            bar.update(done - bar.n)
            bar.set_postfix_str(message)

        results = table1.run_table1(samples, vaes, config, out, with_lpips=not args.no_lpips, progress=show_progress,
                                    reference=reference)
    if results["skipped"]:
        print(f"Skipped {len(results['skipped'])} samples finished by an earlier run into {out}.")
    for note in results["notes"]:
        print(f"note: {note}")
    print((out / "table1.md").read_text(encoding="utf-8"))
    print(f"Wrote {out / 'metrics.json'}, table1.md, table1.csv and per-sample snapshots under {out / 'samples'}")
    return 0


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Append "(default: X)" to an option's help, unless it has no default or the help names one already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if no_default or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _add_command(commands, name: str, summary: str) -> argparse.ArgumentParser:
    """Add a subcommand whose --help starts with ``summary`` and shows each option's default."""
    return commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                               formatter_class=_DefaultsHelpFormatter)


def _add_table1_parser(commands) -> None:
    table = _add_command(
        commands, "table1", "the iterative-editing benchmark: each sample edited N times in sequence, per VAE")
    table.add_argument("samples", nargs="?",
                       help="folder with manifest.csv or manifest.json (columns image, mask, instruction, "
                            "reverse_instruction, reference, name), or the manifest file itself")
    table.add_argument("--dataset", help="a Hugging Face dataset name instead of a folder (needs network access "
                                         "and the datasets package; its columns must use the manifest names)")
    table.add_argument("--split", default="test", help="dataset split to read with --dataset")
    table.add_argument("--limit", type=int, help="use only the first N samples")
    table.add_argument("--models", required=True, help="two or more comma-separated VAE references")
    table.add_argument("--editor", choices=("ip2p", "inpaint", "pbe"), default="ip2p",
                       help="ip2p alternates instruction and reverse instruction; inpaint and pbe repeat one edit")
    table.add_argument("--model", help="the editor's pipeline: hub id or local folder (default: the op's default)")
    table.add_argument("--edits", type=int, default=25, help="edits per sample")
    table.add_argument("--snapshots", default="1,5,15,25",
                       help="comma-separated steps whose images are saved and measured; must include 1")
    table.add_argument("--steps-per-edit", type=int, default=20, help="denoising steps of each edit")
    table.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the op's)")
    table.add_argument("--image-guidance", type=float, help="ip2p image guidance scale (default: the op's)")
    table.add_argument("--mask", help="mask for samples without one: x,y,w,h in pixels or an image file")
    table.add_argument("--keep-unmasked", action="store_true",
                       help="inpaint and pbe: paste input pixels back outside the mask after each edit")
    table.add_argument("--size", type=int, default=512,
                       help="shorter side of the working image in pixels, centre-cropped to a multiple of 8")
    table.add_argument("--seed", type=int, default=0, help="run seed; each (sample, step) seed derives from it")
    table.add_argument("--no-lpips", action="store_true", help="skip LPIPS (reported as null)")
    table.add_argument("--out", default="out/table1", help="output folder; a rerun into it skips finished samples")
    table.add_argument("--reference", metavar="FILE",
                       help="CSV or JSON file of published numbers for the same editor, shown as a second table "
                            "in table1.md (template: benchmarks/table1_reference_template.json)")
    table.set_defaults(handler=_table1)


def _models(args: argparse.Namespace) -> int:
    from reed.models import BUILTIN_MODELS

    for name, folder in BUILTIN_MODELS.items():
        state = "ready" if (folder / "diffusion_pytorch_model.safetensors").is_file() else "weights missing"
        print(f"{name:<22} {state:<16} {folder}")
    print("Any diffusers AutoencoderKL also works: a local folder, or a hub id such as stabilityai/sd-vae-ft-mse.")
    return 0


def _ops(args: argparse.Namespace) -> int:
    from reed.edits import OPERATIONS

    for operation in OPERATIONS.values():
        print(operation.describe())
    return 0


def _photos(args: argparse.Namespace) -> int:
    from reed.data import HELD_OUT, TRAIN_PHOTOS, bundled_path
    from reed.images import load_image, save_png

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for photo in TRAIN_PHOTOS if args.train else HELD_OUT:
        save_png(load_image(bundled_path(photo)).pixels, out / f"{photo.name}.png")
        print(out / f"{photo.name}.png")
    return 0


def _point_to_checkpoints(folder: Path) -> None:
    """Reject a run folder or its ``checkpoints/`` folder with the paths that export does take."""
    for checkpoints in (folder, folder / "checkpoints"):
        steps = sorted(p for p in checkpoints.glob("step-*") if p.is_dir()) if checkpoints.is_dir() else []
        if steps and not (folder / "config.json").is_file():
            model = checkpoints.parent / "model"
            finished = f" or the finished model {model}," if (model / "config.json").is_file() else ""
            raise ValueError(f"{folder} contains training checkpoints, not one model. Export one checkpoint, "
                             f"for example the latest, {steps[-1]},{finished} instead.")


def _export(args: argparse.Namespace) -> int:
    import torch

    from reed.models import load_vae
    from reed.train import is_checkpoint, load_checkpoint_vae

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    _point_to_checkpoints(Path(args.model))
    if is_checkpoint(args.model):
        vae = load_checkpoint_vae(args.model, args.weights)
    elif args.weights != "trained":
        raise ValueError("--weights ema applies to a training checkpoint folder (runs/NAME/checkpoints/step-*).")
    else:
        vae = load_vae(args.model, cached=False, channels_last=False)
    # torch's own cast: diffusers' override warns about modules to keep in float32, and AutoencoderKL
    # has none.
    vae = torch.nn.Module.to(vae, dtypes[args.dtype])
    vae.save_pretrained(args.out, safe_serialization=True)
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(f"Wrote {args.out} ({args.dtype}, {size / 1e6:.1f} MB of weights)")
    return 0


def _split_models(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--models needs at least one model, for example reed-mini:standard,reed-mini:reed.")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--models lists {', '.join(repeated)} more than once. Name each model once.")
    return names


def _add_engine_arguments(command: argparse.ArgumentParser) -> None:
    speed = command.add_argument_group("speed", "see benchmarks/README.md for what each setting gains here")
    speed.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="precision of the VAE computation (default float32; bfloat16 shifts the figures, "
                            "see benchmarks/README.md)")
    speed.add_argument("--tile", type=int, metavar="PIXELS",
                       help="encode and decode images larger than this in overlapping tiles of this size "
                            "(a multiple of 8), to bound memory on large images")
    speed.add_argument("--batch", type=int, default=1,
                       help="round-trip up to this many images of one size together (default 1)")
    speed.add_argument("--threads", type=int, help="PyTorch CPU threads (default: PyTorch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reed",
                                     description="REED-VAE training, edit chains and round-trip metrics.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a VAE or REED-fine-tune a decoder from a YAML config")
    train.add_argument("config", help="YAML file with the fields of reed.config.TrainConfig")
    train.add_argument("--output-dir", help="override output_dir from the config")
    train.add_argument("--steps", type=int, help="override steps (the length of the schedule)")
    train.add_argument("--max-steps", type=int, help="stop after this many steps in total; resume later")
    train.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in output_dir")
    train.add_argument("--random-init", action="store_true",
                       help="build the config's model architecture with random weights instead of loading base "
                            "(smoke tests and cost measurements without the hub)")
    train.set_defaults(handler=_train)

    default_models = "reed-mini:standard,reed-mini:reed,reed-mini:control"
    # Kept in step with reed.images.MAX_WORKING_SIDE, which is not imported here because it would load
    # torch for every --help.
    size_help = ("resize the shorter side to this many pixels (a multiple of 8) and centre-crop the longer "
                 "side to a multiple of 8; without it an image keeps its size (padded for the VAE and "
                 "cropped back), its longer side capped at 1024 pixels")
    ladder = _add_command(commands, "ladder", "repeated encode/decode round trips (the pure ladder)")
    ladder.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    ladder.add_argument("--models", default=default_models, help="comma-separated model references")
    ladder.add_argument("--cycles", type=int, default=25, help="number of round trips")
    ladder.add_argument("--size", type=int, help=size_help)
    ladder.add_argument("--seed", type=int, default=0,
                        help="run seed; each step's seed derives from it (round trips draw none)")
    ladder.add_argument("--out", default="out/ladder",
                        help="output folder; a rerun replaces the results of an earlier ladder or chain run there")
    _add_engine_arguments(ladder)
    ladder.set_defaults(handler=_ladder)

    chain = _add_command(commands, "chain", "run an edit chain on images with several models")
    chain.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    chain.add_argument("--chain", required=True,
                       help='the chain in text form ("roundtrip*10 | rotate degrees=5"), as JSON, '
                            "or a .txt or .json file holding either")
    chain.add_argument("--models", default=default_models, help="comma-separated model references")
    chain.add_argument("--size", type=int, help=size_help)
    chain.add_argument("--seed", type=int, default=0, help="seed for random edits, the same for every model")
    chain.add_argument("--out", default="out/chain",
                        help="output folder; a rerun replaces the results of an earlier ladder or chain run there")
    _add_engine_arguments(chain)
    chain.set_defaults(handler=_chain)

    _add_table1_parser(commands)

    photos = commands.add_parser("photos", help="write the bundled photos as PNG files (held-out ones by default)")
    photos.add_argument("out", help="output folder")
    photos.add_argument("--train", action="store_true", help="write the training photos instead")
    photos.set_defaults(handler=_photos)

    export = _add_command(commands, "export", "re-save a VAE as a diffusers folder with safetensors weights")
    export.add_argument("model", help="model reference: built-in name, folder, hub id, or a training "
                        "checkpoint folder (runs/NAME/checkpoints/step-*)")
    export.add_argument("out", help="output folder")
    export.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="storage precision of the weights; loading converts them back to float32")
    export.add_argument("--weights", choices=("trained", "ema"), default="trained",
                        help="for a checkpoint folder: the weights at that step, or their moving average")
    export.set_defaults(handler=_export)

    commands.add_parser("models", help="list the built-in models").set_defaults(handler=_models)
    commands.add_parser("ops", help="list the edit operations and their parameters").set_defaults(handler=_ops)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.handler(args)
    except BrokenPipeError:
        # The reader of stdout went away (`python -m reed ops | head`): stop quietly, as Unix tools do.
        # Pointing stdout at devnull keeps Python's final flush from raising again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
