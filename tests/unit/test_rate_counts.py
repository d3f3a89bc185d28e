"""The write rate limit's shared counts (``orderstream.auth.rate_counts``): one limit
across processes, and a guard that never fails or stalls the write it counts."""

from __future__ import annotations

import fcntl
import multiprocessing
import time
from pathlib import Path

import limits
from limits.storage import MemoryStorage

from orderstream.auth.rate_counts import FILE_NAME, LOCK_WAIT, SharedRateCounts, rate_counts

TEN_A_MINUTE = limits.parse("10/minute")


def _hits(data_dir: Path, n: int) -> int:
    limiter = limits.strategies.MovingWindowRateLimiter(SharedRateCounts(data_dir))
    return sum(limiter.hit(TEN_A_MINUTE, "cust-4") for _ in range(n))


def test_three_processes_share_one_limit(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        accepted = pool.starmap(_hits, [(tmp_path, 40)] * 3)
    assert sum(accepted) == 10, accepted


def test_a_data_dir_it_cannot_write_counts_in_memory_instead_of_failing(tmp_path: Path) -> None:
    (tmp_path / f"{FILE_NAME}.lock").mkdir()  # opening it fails as a read-only directory would
    storage = rate_counts(tmp_path)
    assert isinstance(storage, MemoryStorage)
    limiter = limits.strategies.MovingWindowRateLimiter(storage)
    assert [limiter.hit(TEN_A_MINUTE, "c") for _ in range(11)] == [True] * 10 + [False]


def test_a_lock_held_elsewhere_neither_stalls_nor_fails_a_hit(tmp_path: Path) -> None:
    storage = SharedRateCounts(tmp_path)
    limiter = limits.strategies.MovingWindowRateLimiter(storage)
    assert limiter.hit(TEN_A_MINUTE, "c")
    with (tmp_path / f"{FILE_NAME}.lock").open("a+b") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # a process stopped while holding it
        started = time.monotonic()
        assert limiter.hit(TEN_A_MINUTE, "c")  # counted in memory
        assert time.monotonic() - started < LOCK_WAIT + 0.5
    assert limiter.hit(TEN_A_MINUTE, "c")  # shared again
    assert storage.get_moving_window("LIMITER/c/10/1/minute", 10, 60)[1] >= 1


def test_the_window_tells_when_a_refused_caller_may_write_again(tmp_path: Path) -> None:
    limiter = limits.strategies.MovingWindowRateLimiter(SharedRateCounts(tmp_path))
    before = time.time()
    for _ in range(10):
        assert limiter.hit(TEN_A_MINUTE, "c")
    assert not limiter.hit(TEN_A_MINUTE, "c")
    reset_at, remaining = limiter.get_window_stats(TEN_A_MINUTE, "c")
    assert remaining == 0
    assert before + 59 <= reset_at <= time.time() + 60
