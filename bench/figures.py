"""What every benchmark measures: counts, seconds, latencies."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Figure:
    """Counts and seconds accumulated over rounds, and per-operation latencies."""

    count: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    cpu_seconds: float = 0.0
    """Process CPU time (every thread) over the same spans as ``seconds``: unlike the rate,
    it does not move with the disk's fsync time, which other work on a VM makes drift."""

    @property
    def cpu_per_op_us(self) -> float:
        return self.cpu_seconds / self.count * 1e6 if self.count else float("nan")

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else float("nan")

    def percentile(self, fraction: float) -> float:
        """The latency at ``fraction`` (0.5 = p50), in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000
