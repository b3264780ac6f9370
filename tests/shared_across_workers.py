"""What the pytest-xdist workers of one `make test` compute once and share: each worker
is its own process, so a module-level cache or a session fixture would compute it once
per worker."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock


def run_folder(basetemp: Path) -> Path:
    """The temporary folder of this test run that every worker sees: a worker's base
    folder (popen-gw0, ...) lies in it; without workers, the base folder is it."""
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp


def computed_once(record: Path, compute: Callable[[], Any]) -> Any:
    """`compute()`'s result (JSON), computed by the first worker to ask and written to
    `record`; the others wait for it and read it."""
    with FileLock(f"{record}.lock"):
        if not record.exists():
            record.write_text(json.dumps(compute()))
    return json.loads(record.read_text())
