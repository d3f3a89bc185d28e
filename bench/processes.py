"""What a benchmarked server process costs: CPU time from /proc, and py-spy profiles.

CPU is read for a process and all its descendants (an ASGI server with
``--workers`` forks them), so "1.0" means one core busy for the whole run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    return text.rpartition(")")[2].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of these processes and their descendants."""
    total = 0
    for root in pids:
        for pid in process_tree(root):
            fields = _stat(pid)
            if fields is not None:
                total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


# ----------------------------------------------------------------------------- py-spy


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("--py-spy needs py-spy: pip install py-spy")
    return found


def record(pid: int, output: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Sample ``pid`` and its subprocesses for ``seconds`` into a collapsed-stack file
    (one ``frame;frame;... count`` line per stack; speedscope.app opens it too).

    Only samples of threads holding the GIL (``--gil``): a Python server process is
    bound by it, and idle waits (executor threads on their queue, the event loop in
    ``select``) would otherwise show up as work."""
    command = [py_spy(), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    command += ["--rate", "100", "--format", "raw", "--subprocesses", "--nonblocking", "--gil"]
    command += ["-o", str(output)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass(frozen=True)
class Profile:
    """Where the samples of a collapsed-stack file end: by leaf function and by package."""

    samples: int
    functions: list[tuple[str, float]]
    packages: list[tuple[str, float]]

    def lines(self, top: int = 12) -> list[str]:
        if not self.samples:
            return ["(no samples)"]
        by_package = ", ".join(f"{name} {share:.0%}" for name, share in self.packages[:top])
        out = [f"{self.samples} samples holding the GIL; self time by package: {by_package}"]
        out += [f"  {share:5.1%}  {name}" for name, share in self.functions[:top]]
        return out


def package_of(file: str) -> str:
    """py-spy's short file names: ``litestar/routes/http.py`` -> ``litestar``,
    ``asyncio/events.py`` -> ``asyncio``, a lone ``thread.py`` -> ``thread``."""
    head, sep, _ = file.partition("/")
    return head if sep else Path(file).stem


def summarize(path: Path) -> Profile:
    functions: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    samples = 0
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        found = _FRAME.match(leaf)
        function, file = (found["function"], found["file"]) if found else (leaf, "")
        n = int(count)
        samples += n
        functions[f"{function} ({Path(file).name})"] += n
        packages[package_of(file)] += n

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, n / samples) for name, n in counter.most_common()]

    return Profile(samples, shares(functions), shares(packages))
