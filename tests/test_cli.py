"""The python -m reed command line, run on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reed.cli import main


def write_photo(path, photo):
    Image.fromarray(photo).save(path)
    return str(path)


def test_ladder_writes_every_output(tmp_path, photo, tiny_vae_dir, other_tiny_vae_dir):
    image = write_photo(tmp_path / "cat.png", photo)
    out = tmp_path / "out"
    code = main(["ladder", image, "--models", f"{tiny_vae_dir},{other_tiny_vae_dir}", "--cycles", "3",
                 "--size", "32", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert len(rows) == 6
    assert {"image", "model", "step", "op", "mse_src", "psnr_src", "ssim_src", "mse_x1", "psnr_x1", "ssim_x1",
            "lpips_src", "lpips_x1"} <= set(rows[0])
    assert [row["step"] for row in rows if row["model"] == tiny_vae_dir] == [1, 2, 3]
    assert (out / "metrics.csv").read_text().count("\n") == 7
    assert (out / "curves.png").is_file()
    assert (out / "grid-cat.png").is_file()
    step_images = sorted((out / "images" / "cat").rglob("*.png"))
    assert len(step_images) == 6
    assert Image.open(step_images[0]).size == (40, 32)  # shorter side 32, width cropped to a multiple of 8


def test_chain_keeps_odd_size(tmp_path, photo, tiny_vae_dir):
    odd = np.ascontiguousarray(photo[:37, :51])
    image = write_photo(tmp_path / "odd.png", odd)
    out = tmp_path / "out"
    code = main(["chain", image, "--chain", "roundtrip | rotate degrees=3 | jpeg quality=80", "--models",
                 tiny_vae_dir, "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert [row["op"] for row in rows] == ["roundtrip", "rotate", "jpeg"]
    final = sorted((out / "images" / "odd").rglob("step-003-*.png"))[0]
    assert Image.open(final).size == (51, 37)


def test_chain_rerun_replaces_earlier_outputs(tmp_path, photo, tiny_vae_dir, other_tiny_vae_dir, capsys):
    image = write_photo(tmp_path / "cat.png", photo)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["chain", image, "--chain", "roundtrip*3", "--models", f"{tiny_vae_dir},{other_tiny_vae_dir}",
                 "--size", "32", "--out", str(out)]) == 0
    capsys.readouterr()

    assert main(["chain", image, "--chain", "roundtrip", "--models", tiny_vae_dir, "--size", "32",
                 "--out", str(out)]) == 0

    assert "Replacing the results of an earlier run" in capsys.readouterr().out
    step_images = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert len(step_images) == 1
    assert step_images[0].endswith("step-001-roundtrip.png")
    assert len(json.loads((out / "metrics.json").read_text())) == 1
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_bad_chain_reports_error(tmp_path, photo, tiny_vae_dir, capsys):
    image = write_photo(tmp_path / "a.png", photo)
    code = main(["chain", image, "--chain", "roundtrip | sepia", "--models", tiny_vae_dir, "--out", str(tmp_path)])
    assert code == 2
    assert "Unknown operation 'sepia'" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_corrupt_image_reports_error(tmp_path, tiny_vae_dir, capsys):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    code = main(["ladder", str(broken), "--models", tiny_vae_dir, "--cycles", "2", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "Could not read" in capsys.readouterr().err


def test_ops_lists_operations(capsys):
    assert main(["ops"]) == 0
    listing = capsys.readouterr().out
    for name in ("roundtrip", "rotate", "jpeg", "crop", "text"):
        assert f"{name}:" in listing


def test_export_float16_loads_as_float32(tmp_path, tiny_vae_dir, photo):
    from reed.edits.vae_ops import vae_roundtrip
    from reed.models import load_vae

    out = tmp_path / "half"
    assert main(["export", tiny_vae_dir, str(out), "--dtype", "float16"]) == 0
    half = (tmp_path / "half" / "diffusion_pytorch_model.safetensors").stat().st_size
    full = (Path(tiny_vae_dir) / "diffusion_pytorch_model.safetensors").stat().st_size
    assert half < 0.6 * full
    vae = load_vae(str(out), cached=False)
    assert vae.dtype == torch.float32
    difference = vae_roundtrip(vae, photo).astype(int) - vae_roundtrip(load_vae(tiny_vae_dir, cached=False), photo)
    assert abs(difference).max() <= 2


def _step_images(out: Path) -> dict[str, np.ndarray]:
    return {str(path.relative_to(out)): np.asarray(Image.open(path)) for path in sorted((out / "images").rglob("*.png"))}


def test_ladder_batch_matches_one_by_one(tmp_path, photo, tiny_vae_dir, monkeypatch):
    import reed.chain

    first = write_photo(tmp_path / "a.png", photo)
    second = write_photo(tmp_path / "b.png", np.ascontiguousarray(photo[:, ::-1]))
    batch_sizes = []
    batched_roundtrip = reed.chain.vae_roundtrip_many

    def counting(vae, images, tile=None):
        batch_sizes.append(len(images))
        return batched_roundtrip(vae, images, tile)

    monkeypatch.setattr(reed.chain, "vae_roundtrip_many", counting)
    arguments = ["ladder", first, second, "--models", tiny_vae_dir, "--cycles", "2", "--threads", "1"]
    assert main(arguments + ["--out", str(tmp_path / "one")]) == 0
    assert batch_sizes == []
    assert main(arguments + ["--batch", "2", "--out", str(tmp_path / "two")]) == 0
    assert batch_sizes == [2, 2]

    single, batched = _step_images(tmp_path / "one"), _step_images(tmp_path / "two")
    assert single.keys() == batched.keys()
    assert len(single) == 4
    for name in single:
        # A batched convolution may round differently, by at most one 8-bit level after one step. This
        # random-weight VAE amplifies such differences in later steps, so only step 1 is compared.
        if "step-001" in name:
            assert np.abs(single[name].astype(int) - batched[name]).max() <= 1, name
    rows = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert [(row["image"], row["step"]) for row in rows] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]


def test_ladder_bfloat16_and_tiles_run(tmp_path, photo, tiny_vae_dir):
    image = write_photo(tmp_path / "cat.png", photo)
    out = tmp_path / "out"
    code = main(["ladder", image, "--models", tiny_vae_dir, "--cycles", "2", "--dtype", "bfloat16",
                 "--tile", "32", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert len(rows) == 2
    assert 5.0 < rows[0]["psnr_src"] < 100.0


def test_engine_options_are_checked(tmp_path, photo, tiny_vae_dir, capsys):
    image = write_photo(tmp_path / "cat.png", photo)
    base = ["ladder", image, "--models", tiny_vae_dir, "--cycles", "1", "--out", str(tmp_path / "out")]
    assert main(base + ["--batch", "0"]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().err
    assert main(base + ["--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert main(base + ["--tile", "13"]) == 2  # the tiny VAE's downsampling factor is 2
    assert "tile size must be a positive multiple" in capsys.readouterr().err


def test_repeated_model_is_rejected(tmp_path, photo, tiny_vae_dir, capsys):
    image = write_photo(tmp_path / "cat.png", photo)
    code = main(["ladder", image, "--models", f"{tiny_vae_dir},{tiny_vae_dir}", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "more than once" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_closed_pipe_ends_quietly():
    import subprocess
    import sys

    # `ops` with a listing far longer than a pipe's buffer, so writing must hit the closed pipe.
    flood = ("import reed.cli as cli\n"
             "def long_listing(args):\n"
             "    for index in range(200000):\n"
             "        print('operation', index)\n"
             "    return 0\n"
             "cli._ops = long_listing\n"
             "raise SystemExit(cli.main(['ops']))\n")
    listing = subprocess.Popen([sys.executable, "-c", flood], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    listing.stdout.readline()
    listing.stdout.close()  # like `| head -1`: the reader goes away before the listing ends
    _, errors = listing.communicate(timeout=120)
    assert b"Traceback" not in errors
    assert listing.returncode == 1


def test_size_help_names_working_cap(capsys):
    from reed.images import MAX_WORKING_SIDE

    try:
        main(["ladder", "--help"])
    except SystemExit:
        pass
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"capped at {MAX_WORKING_SIDE} pixels" in help_text
    assert "(default: 25)" in help_text  # --cycles shows its default
