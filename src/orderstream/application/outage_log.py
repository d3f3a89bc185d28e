"""Log an outage once when it begins and once when it ends, not once per attempt.

Background work that retries while a dependency is away (a full disk, a store that
cannot be reached) would otherwise write a line per attempt: the projection runner
reconnects every fraction of a second on a full disk, every snapshot write fails
with the same error. Those lines bury the one that says what happened, and on a
full disk they fill the log's disk too. :class:`OutageLog` writes the first failure
(with its traceback where the caller asks), a new line only when the error changes
kind, and, when the work succeeds again, a summary: how long it lasted and how many
attempts failed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass


@dataclass(eq=False)
class OutageLog:
    """One kind of background work's outages, for ``logger``, described as ``what``."""

    logger: logging.Logger
    what: str
    since: float | None = None
    """``time.monotonic()`` of the first failure of the current outage."""
    failures: int = 0
    kind: type[BaseException] | None = None
    """The error last logged: another kind is logged again."""

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException, *, detail: str = "", traceback: bool = False) -> None:
        """An attempt failed: logged if it starts an outage or is a new kind of error
        (``detail``: which attempt, e.g. the stream)."""
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
        if type(exc) is self.kind:
            return
        self.kind = type(exc)
        self.logger.warning(
            "%s: failed%s: %s (retrying; logged again when it works or fails differently)",
            self.what,
            f" ({detail})" if detail else "",
            exc,
            exc_info=exc if traceback else None,
        )

    def succeeded(self) -> None:
        """The work went through: ends the outage, with a summary, if there was one."""
        if self.since is None:
            return
        self.logger.warning(
            "%s: working again after %.1f s and %d failed attempts",
            self.what,
            time.monotonic() - self.since,
            self.failures,
        )
        self.since, self.failures, self.kind = None, 0, None
