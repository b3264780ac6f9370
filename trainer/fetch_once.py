"""Fetch a folder once onto a volume that many processes on many nodes share.

Used for the base model cache (`model.cache_dir`) and for instance images from a URL.
Two mechanisms, each with one job:

- **Atomic rename** (correctness): the fetch writes into a private staging folder that
  is renamed to the target only when complete. A reader sees no target or a whole one.
- **Lock file** (saving bandwidth): `O_CREAT|O_EXCL` on `.<target>.lock`, which works on
  NFS-like shared filesystems where `flock` may not. The holder touches the lock's mtime
  every `heartbeat_seconds`; waiters poll. A waiter that sees the lock's mtime unchanged
  for `stale_seconds` by its own clock (no comparison between machines' clocks) takes
  it over: the holder died, e.g. with its node. In the narrow race of two waiters taking
  over at once both may download; the rename still lets only one complete copy in.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

# Inside every fetched folder: where it came from, who fetched it, how long it took.
FETCH_RECORD = ".fetched.json"


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def staging_path(target: Path, owner: str) -> Path:
    return target.with_name(f".{target.name}.partial-{owner}")


def fetch_once(target: Path, fetch: Callable[[Path], None], *, what: str, poll_seconds: float = 2.0,
               stale_seconds: float = 120.0, heartbeat_seconds: float = 10.0) -> bool:
    """Make `target` a complete folder; `fetch(folder)` fills an empty folder. Returns
    True when this process fetched it, False when it was there or another one did.
    An exception of `fetch` propagates; the lock is released, so a waiter tries again."""
    target.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    waiter = _Waiter(lock_path(target), what, stale_seconds)
    while not target.is_dir():
        if not _try_lock(lock_path(target), owner):
            waiter.wait(poll_seconds)
            continue
        try:
            if target.is_dir():  # completed between our check and our lock
                return False
            with _heartbeat(lock_path(target), heartbeat_seconds):
                _fetch_into(target, fetch, owner, what)
            return True
        finally:
            _unlock(lock_path(target), owner)
    return False


def _fetch_into(target: Path, fetch: Callable[[Path], None], owner: str, what: str) -> None:
    staging = staging_path(target, owner)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    started = time.monotonic()
    log.info("fetching %s into %s", what, target)
    try:
        fetch(staging)
        record = {"source": what, "by": owner, "seconds": round(time.monotonic() - started, 3)}
        (staging / FETCH_RECORD).write_text(json.dumps(record))
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise
        # Someone who took over a lock they judged stale finished first: theirs is complete.
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _try_lock(path: Path, owner: str) -> bool:
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(owner)
    return True


def _read_owner(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _unlock(path: Path, owner: str) -> None:
    # Only our own lock: a waiter may have taken it over while we were stalled.
    if _read_owner(path) == owner:
        path.unlink(missing_ok=True)


@contextmanager
def _heartbeat(path: Path, every_seconds: float) -> Iterator[None]:
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_seconds):
            try:
                os.utime(path)
            except OSError:
                return

    thread = threading.Thread(target=beat, name="fetch-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class _Waiter:
    """Polls a lock someone else holds; takes it over when its heartbeat stopped."""

    def __init__(self, lock: Path, what: str, stale_seconds: float):
        self.lock = lock
        self.what = what
        self.stale_seconds = stale_seconds
        self.seen: tuple[int, str | None] | None = None
        self.seen_since = time.monotonic()
        self.last_log = 0.0

    def wait(self, poll_seconds: float) -> None:
        try:
            state = (self.lock.stat().st_mtime_ns, _read_owner(self.lock))
        except FileNotFoundError:
            return  # released: try to take it at once
        now = time.monotonic()
        if state != self.seen:
            self.seen, self.seen_since = state, now
        if now - self.last_log >= 30.0:
            self.last_log = now
            log.info("waiting for %s to finish fetching %s (lock %s)", state[1], self.what, self.lock)
        if now - self.seen_since >= self.stale_seconds:
            self._take_over(state[1])
            return
        time.sleep(poll_seconds)

    def _take_over(self, stale_owner: str | None) -> None:
        if _read_owner(self.lock) != stale_owner:
            return  # it changed hands meanwhile
        log.warning("lock %s of %s shows no heartbeat for %.0f s: taking over from %s",
                    self.lock, self.what, self.stale_seconds, stale_owner)
        # Rename first (atomic: only one waiter gets it), then delete the private copy.
        retired = self.lock.with_name(f"{self.lock.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.lock, retired)
        except FileNotFoundError:
            return
        retired.unlink(missing_ok=True)
        if stale_owner:
            target = self.lock.with_name(self.lock.name.removeprefix(".").removesuffix(".lock"))
            shutil.rmtree(staging_path(target, stale_owner), ignore_errors=True)
        self.seen = None
