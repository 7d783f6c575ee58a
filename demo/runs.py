"""Per-request output folders for the app, and the removal of old ones.

Each comparison writes its files (metrics, plots, grids, step images) into a fresh folder under
``RUNS_ROOT``, so one visitor never receives another visitor's files. Folders live in the system temp
directory because Gradio serves files from there without extra ``allowed_paths``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

RUNS_ROOT = Path(tempfile.gettempdir()) / "reed-demo-runs"
RUN_PREFIX = "run-"
# A result folder is removed once it is older than this, so the step slider of a result keeps working
# for about this long after its run.
MAX_RUN_AGE_S = 3600
# The newest folders kept regardless of age, which bounds the disk a busy server uses.
MAX_RUN_FOLDERS = 32


def new_run_folder(root: Path = RUNS_ROOT) -> Path:
    """Remove expired run folders, then create and return an empty folder for one request."""
    root.mkdir(parents=True, exist_ok=True)
    remove_old_runs(root)
    return Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=root))


def remove_old_runs(root: Path = RUNS_ROOT, max_age_s: float = MAX_RUN_AGE_S,
                    keep: int = MAX_RUN_FOLDERS) -> list[Path]:
    """Delete run folders older than ``max_age_s`` and all but the ``keep`` newest; return the deleted ones.

    Only folders named ``run-*`` directly under ``root`` are considered, so nothing else in the temp
    directory is touched.
    """
    if not root.is_dir():
        return []
    folders = sorted((path for path in root.glob(RUN_PREFIX + "*") if path.is_dir()),
                     key=lambda path: path.stat().st_mtime, reverse=True)
    now = time.time()
    expired = [path for index, path in enumerate(folders)
               if index >= keep or now - path.stat().st_mtime > max_age_s]
    for path in expired:
        # Another worker may be removing the same folder at the same moment.
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed old run folder %s", path)
    return expired


def zip_folder(folder: Path, name: str) -> Path:
    """Pack every file under ``folder`` into ``folder / name`` (a zip) and return its path."""
    archive = folder / name
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path != archive)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for path in files:
            bundle.write(path, path.relative_to(folder))
    return archive
