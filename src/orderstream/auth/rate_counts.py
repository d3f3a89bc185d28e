"""Where the write rate limit counts: one SQLite file in the data dir, shared by
every API process that serves from it.

``serve`` runs two API worker processes by default (and ``api --workers N`` as
many as asked), each taking whichever connection the kernel hands it. Counted in
each process's memory, one identity could write N times the limit. The moving
window of :mod:`limits` (``MovingWindowRateLimiter``) stays the library's; this
module is only its storage: one row per accepted write, ``(key, at)``, in
``<data dir>/rate-limits.db``.

- A hit is one short transaction (prune the key's expired rows, count, insert)
  inside an ``flock`` on a file beside it, so processes queue on the lock and
  wake as it is released, instead of SQLite's busy handler sleeping 1, 2, 5 ms.
  About 45 us of the writing request, in its event loop (the library's memory
  storage: 7 us; 5,000 hits over 200 identities, one process); reads (the window
  for ``Retry-After``) take no lock (WAL). Admins are not counted.
- ``synchronous=NORMAL`` (WAL): the counts are not worth an fsync per write. A
  crash of the machine may forget the last writes' rows, which lets a caller a
  few writes more; a process crash loses nothing.
- Rows of identities that stopped writing are pruned every
  :data:`PRUNE_EVERY` hits, past the longest window in use; a count reads at most
  ``limit`` rows, so a large limit does not make every write slower.
- The counts are a guard, not a dependency: when the file cannot be opened (a
  read-only data dir, no ``flock`` on that filesystem) or the lock is not had
  within :data:`LOCK_WAIT` seconds (a process holding it is stopped), the hit is
  counted in this process's memory instead, with a warning, rather than failing
  the write or stalling the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from limits.storage import MemoryStorage, MovingWindowSupport, Storage

FILE_NAME = "rate-limits.db"
PRUNE_EVERY = 1000
LOCK_WAIT = 0.05
"""Seconds a hit waits for the shared lock before it counts in memory."""
WARN_EVERY = 60.0
"""Seconds between two warnings that the shared counts are not reachable."""
log = logging.getLogger("orderstream.auth")


class CountsUnavailable(Exception):
    """The shared lock was not had within :data:`LOCK_WAIT`."""


def rate_counts(data_dir: Path) -> Storage:
    """The shared counts of ``data_dir``, or this process's memory when they cannot be opened."""
    try:
        return SharedRateCounts(data_dir)
    except (OSError, sqlite3.Error) as exc:
        log.warning("write rate limit: counting in this process only: %s: %s", FILE_NAME, repr(exc))
        return MemoryStorage()


class SharedRateCounts(Storage, MovingWindowSupport):
    """A :mod:`limits` storage for the moving window, in a SQLite file shared by
    processes (see the module docstring). Only the moving window: the fixed-window
    calls of the storage interface are refused."""

    STORAGE_SCHEME = None  # made here, not from a limits URI

    def __init__(self, data_dir: Path) -> None:
        super().__init__()
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / FILE_NAME
        self._lock_file = (data_dir / f"{FILE_NAME}.lock").open("a+b")
        self._db = sqlite3.connect(path, isolation_level=None, timeout=LOCK_WAIT)
        with self._locked(wait=10.0):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS hits (key TEXT NOT NULL, at REAL NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS hits_by_key ON hits (key, at)")
            self._db.execute("CREATE INDEX IF NOT EXISTS hits_by_time ON hits (at)")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._hits = 0
        self._longest = 0
        self._memory = MemoryStorage()
        self._warned_at = float("-inf")

    @property
    def base_exceptions(self) -> type[Exception]:
        return sqlite3.Error

    @contextlib.contextmanager
    def _locked(self, wait: float = LOCK_WAIT) -> Iterator[None]:
        """The shared lock, waited for at most ``wait`` seconds (in steps of 0.5 ms:
        ``flock`` has no timeout of its own, and this runs in the event loop)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CountsUnavailable(f"the lock of {FILE_NAME} is held") from None
                time.sleep(0.0005)
        try:
            yield
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        try:
            return self._acquire_shared(key, limit, expiry, amount)
        except (OSError, sqlite3.Error, CountsUnavailable) as exc:
            self._warn(exc)
            return self._memory.acquire_entry(key, limit, expiry, amount)

    def _warn(self, exc: Exception) -> None:
        if time.monotonic() - self._warned_at >= WARN_EVERY:
            self._warned_at = time.monotonic()
            log.warning("write rate limit: counting in this process for now: %s", repr(exc))

    def _acquire_shared(self, key: str, limit: int, expiry: int, amount: int) -> bool:
        now = time.time()
        self._longest = max(self._longest, expiry)
        self._hits += 1
        with self._locked():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM hits WHERE key = ? AND at <= ?", (key, now - expiry))
                if self._hits % PRUNE_EVERY == 0:
                    self._db.execute("DELETE FROM hits WHERE at <= ?", (now - self._longest,))
                (count,) = self._db.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM hits WHERE key = ? LIMIT ?)", (key, limit)
                ).fetchone()
                accepted = bool(count + amount <= limit)
                if accepted:
                    self._db.executemany("INSERT INTO hits VALUES (?, ?)", [(key, now)] * amount)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return accepted

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        try:
            start, count = self._db.execute(
                "SELECT min(at), count(*) FROM hits WHERE key = ? AND at > ?", (key, now - expiry)
            ).fetchone()
        except sqlite3.Error as exc:
            self._warn(exc)
            return self._memory.get_moving_window(key, limit, expiry)
        return (now if start is None else float(start)), int(count)

    def clear(self, key: str) -> None:
        with self._locked():
            self._db.execute("DELETE FROM hits WHERE key = ?", (key,))

    def reset(self) -> int:
        with self._locked():
            return self._db.execute("DELETE FROM hits").rowcount

    def check(self) -> bool:
        return bool(self._db.execute("SELECT 1").fetchone() == (1,))

    def close(self) -> None:
        self._db.close()
        self._lock_file.close()

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        raise NotImplementedError("SharedRateCounts backs the moving window only")

    def get(self, key: str) -> int:
        raise NotImplementedError("SharedRateCounts backs the moving window only")

    def get_expiry(self, key: str) -> float:
        raise NotImplementedError("SharedRateCounts backs the moving window only")
