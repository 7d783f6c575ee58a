"""Load tests of the app: concurrent gradio_client users against ``python app.py`` on 127.0.0.1.

Each user uploads its own photo, picks its own seed and runs a short chain on the two tiny random VAEs
of conftest.py. Its result must equal a direct call of ``demo.handlers.run_comparison`` with the same
inputs, so results cannot have been swapped between users. The server's resident memory is sampled from
/proc during the load, and its run folders are counted afterwards.

The CI scale runs by default. The full scale is marked slow and prints the figures that
docs/robustness.md records: ``pytest -m slow -s tests/test_load.py``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app_server import AppServer, running_app
from demo import handlers, runs, ui
from reed.data import held_out_paths
from reed.images import load_image

REPO_ROOT = Path(__file__).resolve().parents[1]
# Maximum wait for one request, queueing included, before the test counts it as lost.
REQUEST_TIMEOUT_S = 600

CI_USERS = 6
CI_CHAIN = "roundtrip | noise sigma=8 | roundtrip"
FULL_USERS = 16
FULL_CHAIN = "roundtrip*4 | noise sigma=8 | roundtrip*5"
# Users' photos are crops of this many pixels a side, run at their own size ("original").
PHOTO_SIDE = 64
# Growth of the server's resident memory over the load, measured from the end of a warm-up request
# that loads both models. A leak of a few megabytes per request would pass at CI scale, but a server
# that kept every request's images and figures would not.
MAX_RSS_GROWTH_MIB = 300
# Run folders older than the expiry age, planted before the server starts: the first run must remove them.
EXPIRED_RUN_FOLDERS = 5
# Requests beyond the queue's capacity in the queue-full test.
EXTRA_REQUESTS = 4
# A run that occupies the only concurrency slot while the queue-full test fills the queue.
BLOCKER_CHAIN = "roundtrip*20"
BLOCKER_WORKING_SIZE = "128"
OUTPUT_NAMES = ["notes", "slider", "caption", "source", "image_a", "image_b", "before_after_a", "before_after_b",
                "difference_a", "difference_b", "step_metrics", "plot", "grid", "table", "files"]


class RssSampler:
    """Sample a server's resident memory every ``interval_s`` seconds in a thread, keeping the peak."""

    def __init__(self, server: AppServer, interval_s: float = 0.2):
        self.server = server
        self.interval_s = interval_s
        self.peak_mib = server.rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mib = max(self.peak_mib, self.server.rss_mib())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak_mib = max(self.peak_mib, self.server.rss_mib())


@dataclass
class User:
    index: int
    photo: Path
    seed: int


@dataclass
class LoadFigures:
    users: int
    completed: int = 0
    rejected: int = 0
    wall_s: float = 0.0
    baseline_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    outputs: dict[int, list] = field(default_factory=dict)
    errors: dict[int, Exception] = field(default_factory=dict)


def _plant_expired_runs(root: Path) -> list[Path]:
    root.mkdir(parents=True)
    stamp = time.time() - runs.MAX_RUN_AGE_S - 60
    folders = []
    for index in range(EXPIRED_RUN_FOLDERS):
        folder = root / f"{runs.RUN_PREFIX}expired-{index}"
        folder.mkdir()
        (folder / "metrics.csv").write_text("model,step\n", encoding="utf-8")
        os.utime(folder, (stamp, stamp))
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """The running app, with expired run folders planted in its run-folder root before it starts."""
    folder = tmp_path_factory.mktemp("load-server")
    _plant_expired_runs(folder / runs.RUNS_ROOT.name)
    with running_app(folder) as server:
        yield server


@pytest.fixture
def client_factory(app_server, tmp_path, monkeypatch):
    """Return a function that opens a new gradio_client session (one user) on the server."""
    from gradio_client import Client

    # gradio_client 2.7 starts a telemetry thread unless this variable is something other than "True".
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    # gradio_client 2.7 leaves an empty folder in the system temp directory for every downloaded output.
    client_temp = tmp_path / "client-temp"
    client_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(client_temp))

    def open_client() -> Client:
        return Client(app_server.url, verbose=False, analytics_enabled=False,
                      download_files=str(tmp_path / "downloads"))

    return open_client


@pytest.fixture(scope="module")
def source_photo() -> np.ndarray:
    return load_image(held_out_paths()["astronaut"]).pixels


def _make_users(count: int, source: np.ndarray, folder: Path) -> list[User]:
    """Give each user a different PHOTO_SIDE crop of ``source`` (walking the diagonal) and its own seed."""
    folder.mkdir(parents=True, exist_ok=True)
    span = min(source.shape[:2]) - PHOTO_SIDE
    users = []
    for index in range(count):
        offset = index * span // max(1, count - 1)
        crop = source[offset:offset + PHOTO_SIDE, offset:offset + PHOTO_SIDE]
        path = folder / f"user-{index:02d}.png"
        Image.fromarray(np.ascontiguousarray(crop)).save(path)
        users.append(User(index, path, seed=1000 + index))
    return users


def _output_value(output):
    """Return the value of an output that a handler returned as a component update (a dict)."""
    if isinstance(output, dict) and output.get("__type__") == "update":
        return output["value"]
    return output


def _read(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _run_users(client_factory, users: list[User], chain_text: str, models: tuple[str, str]) -> LoadFigures:
    """Submit every user's run at once, wait for all of them, and return the outcomes."""
    from gradio_client import handle_file

    clients = [client_factory() for _ in users]
    figures = LoadFigures(users=len(users))
    start = threading.Barrier(len(users))

    def run_one(user: User):
        start.wait(timeout=60)
        job = clients[user.index].submit(handle_file(str(user.photo)), chain_text, models[0], models[1], "original",
                                         user.seed, api_name="/run")
        return job.result(timeout=REQUEST_TIMEOUT_S)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(users)) as pool:
        futures = {user.index: pool.submit(run_one, user) for user in users}
        for index, future in futures.items():
            try:
                figures.outputs[index] = [_output_value(output) for output in future.result()]
            except Exception as error:  # noqa: BLE001 (every failure is recorded and checked by the caller)
                figures.errors[index] = error
    figures.wall_s = time.perf_counter() - started
    figures.completed = len(figures.outputs)
    figures.rejected = sum("Queue is full" in str(error) for error in figures.errors.values())
    return figures


def _warm_up(client_factory, models: tuple[str, str], folder: Path, source: np.ndarray) -> None:
    """Run one request so the server has loaded both models and its plotting code before measuring."""
    from gradio_client import handle_file

    user = _make_users(1, source, folder)[0]
    client_factory().submit(handle_file(str(user.photo)), "roundtrip", models[0], models[1], "original", 0,
                            api_name="/run").result(timeout=REQUEST_TIMEOUT_S)


def _load(app_server, client_factory, users, chain_text, models, folder, source) -> LoadFigures:
    _warm_up(client_factory, models, folder / "warm-up", source)
    baseline = app_server.rss_mib()
    with RssSampler(app_server) as sampler:
        figures = _run_users(client_factory, users, chain_text, models)
    figures.baseline_rss_mib = baseline
    figures.peak_rss_mib = sampler.peak_mib
    return figures


def _direct_result(user: User, chain_text: str, models: tuple[str, str], runs_root: Path, monkeypatch):
    """Run the handler in this process with the user's inputs, on one torch thread as the server does."""
    monkeypatch.setattr(handlers, "new_run_folder", lambda: runs.new_run_folder(runs_root))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return handlers.run_comparison(str(user.photo), chain_text, models[0], models[1], "original", user.seed)
    finally:
        torch.set_num_threads(previous)


def _check_user_results(figures: LoadFigures, users: list[User], chain_text: str, models: tuple[str, str],
                        tmp_path: Path, monkeypatch) -> None:
    step_count = len(handlers.parse_app_chain(chain_text))
    for user in users:
        if user.index not in figures.outputs:
            continue
        outputs = dict(zip(OUTPUT_NAMES, figures.outputs[user.index]))
        direct = _direct_result(user, chain_text, models, tmp_path / "direct-runs", monkeypatch)
        label = f"user {user.index} (seed {user.seed})"

        assert outputs["caption"].startswith(f"**Step {step_count} of {step_count}**"), label
        np.testing.assert_array_equal(_read(outputs["source"]), _read(user.photo), err_msg=label)
        np.testing.assert_array_equal(_read(outputs["image_a"]), direct.view.images[models[0]], err_msg=label)
        np.testing.assert_array_equal(_read(outputs["image_b"]), direct.view.images[models[1]], err_msg=label)


def _check_outcomes(figures: LoadFigures) -> None:
    """Every request completed, or was rejected because the queue was full."""
    for index, error in figures.errors.items():
        assert "Queue is full" in str(error), f"user {index} failed with {type(error).__name__}: {error}"
    assert figures.completed + figures.rejected == figures.users


def _expired_run_folders(app_server: AppServer) -> list[Path]:
    return sorted(app_server.runs_root.glob(f"{runs.RUN_PREFIX}expired-*"))


def _check_run_folders(app_server: AppServer) -> None:
    """The planted expired run folders are gone, and no more than MAX_RUN_FOLDERS are kept."""
    assert _expired_run_folders(app_server) == []
    assert len(list(app_server.runs_root.iterdir())) <= runs.MAX_RUN_FOLDERS


def _report(title: str, figures: LoadFigures, chain_text: str) -> str:
    return (f"{title}: {figures.users} users x {len(handlers.parse_app_chain(chain_text))}-step chain at "
            f"{PHOTO_SIDE}x{PHOTO_SIDE} px: {figures.completed} completed, {figures.rejected} rejected, "
            f"wall {figures.wall_s:.1f} s, server RSS {figures.baseline_rss_mib:.0f} MiB after warm-up, "
            f"peak {figures.peak_rss_mib:.0f} MiB (queue: concurrency {ui.RUN_CONCURRENCY}, "
            f"max size {ui.QUEUE_MAX_SIZE})")


def test_load_ci_scale(app_server, client_factory, tiny_vae_dir, other_tiny_vae_dir, source_photo, tmp_path,
                       monkeypatch):
    models = (tiny_vae_dir, other_tiny_vae_dir)
    users = _make_users(CI_USERS, source_photo, tmp_path / "photos")
    runs_before = len(list(app_server.runs_root.iterdir())) - len(_expired_run_folders(app_server))

    figures = _load(app_server, client_factory, users, CI_CHAIN, models, tmp_path, source_photo)
    print(_report("CI scale", figures, CI_CHAIN))

    _check_outcomes(figures)
    # Fewer users than the queue's capacity, so none may be turned away.
    assert figures.completed == CI_USERS
    _check_user_results(figures, users, CI_CHAIN, models, tmp_path, monkeypatch)
    assert figures.peak_rss_mib - figures.baseline_rss_mib < MAX_RSS_GROWTH_MIB
    _check_run_folders(app_server)
    # The warm-up and every user each add one folder.
    expected_runs = min(runs.MAX_RUN_FOLDERS, runs_before + 1 + CI_USERS)
    assert len(list(app_server.runs_root.iterdir())) == expected_runs


def test_queue_full_rejects_extra_requests(app_server, client_factory, tiny_vae_dir, other_tiny_vae_dir,
                                           source_photo, tmp_path):
    """Requests beyond the queue's capacity, sent while one long run has the only slot, get "Queue is full"."""
    from gradio_client import handle_file
    from gradio_client.utils import Status

    models = (tiny_vae_dir, other_tiny_vae_dir)
    photo = _make_users(1, source_photo, tmp_path / "photos")[0].photo
    client = client_factory()
    blocker = client.submit(handle_file(str(photo)), BLOCKER_CHAIN, *models, BLOCKER_WORKING_SIZE, 0, api_name="/run")
    _wait_for_status(blocker, {Status.PROCESSING, Status.PROGRESS})

    # Requests without a photo wait in the queue like any other, then fail at once with a gr.Error.
    burst = [client.submit(None, "roundtrip", *models, "original", 0, api_name="/run")
             for _ in range(ui.QUEUE_MAX_SIZE + EXTRA_REQUESTS)]
    for job in burst:
        _wait_for_status(job, {Status.IN_QUEUE, Status.QUEUE_FULL, Status.FINISHED})
    assert not blocker.done(), "the blocking run ended before the queue filled; lengthen BLOCKER_CHAIN"

    outcomes = [_outcome(job) for job in burst]
    assert outcomes.count("queue full") == EXTRA_REQUESTS
    assert outcomes.count("no photo") == ui.QUEUE_MAX_SIZE
    blocker.result(timeout=REQUEST_TIMEOUT_S)


def _wait_for_status(job, codes, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while job.status().code not in codes and not job.done():
        if time.monotonic() > deadline:
            pytest.fail(f"job still {job.status().code} after {timeout_s} s, expected one of {codes}")
        time.sleep(0.02)


def _outcome(job) -> str:
    """Classify a finished job: "queue full", "no photo" (the handler's gr.Error) or the unexpected error."""
    try:
        job.result(timeout=REQUEST_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 (the test compares the classification)
        if "Queue is full" in str(error):
            return "queue full"
        if "Upload a photo" in str(error):
            return "no photo"
        return f"{type(error).__name__}: {error}"
    return "completed"


@pytest.mark.slow
def test_load_full_scale(app_server, client_factory, tiny_vae_dir, other_tiny_vae_dir, source_photo, tmp_path,
                         monkeypatch):
    models = (tiny_vae_dir, other_tiny_vae_dir)
    users = _make_users(FULL_USERS, source_photo, tmp_path / "photos")

    figures = _load(app_server, client_factory, users, FULL_CHAIN, models, tmp_path, source_photo)
    print(_report("full scale", figures, FULL_CHAIN))

    _check_outcomes(figures)
    _check_user_results(figures, users, FULL_CHAIN, models, tmp_path, monkeypatch)
    assert figures.peak_rss_mib - figures.baseline_rss_mib < MAX_RSS_GROWTH_MIB
    _check_run_folders(app_server)
