"""A ``kill -9`` of the process that started the Temporal dev server leaves no dev
server behind, and one left behind anyway does not stop the next start.

The defect (a hostile run, twice): after SIGKILL of ``orderstream worker`` or
``serve`` the dev server survived as an orphan (PPID 1) on its port and
``temporal.db``, and every later start was refused (``DevServerExited: ... is in
use by another process``, with a 37-line traceback): a supervisor's restart loop
never recovered. Now the kernel takes it along (``PR_SET_PDEATHSIG``), a start stops
one left behind on its own data dir (its pid file, ``temporal-dev.pid``) and goes
on, and anything else on the port is still refused, in one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orderstream.sagas.dev_server import DevServerConfig, DevServerExited, SupervisedDevServer
from tests.served import ROOT, cli_env, free_port, running, served

pytestmark = pytest.mark.temporal

PID_FILE = "temporal-dev.pid"
"""Beside ``temporal.db``, as docs/operations.md says."""

LEAVE_BEHIND = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path

    from orderstream.sagas import dev_server

    dev_server.PARENT_DEATH_SIGNAL = None  # as an older orderstream, or another system, started it


    async def main() -> None:
        config = dev_server.DevServerConfig(port=int(sys.argv[1]), ui_port=None, db_file=Path(sys.argv[2]))
        await dev_server.SupervisedDevServer(config).start()
        # Past its start-up output: the next line it writes to our pipe, once we are
        # gone, kills it (SIGPIPE); with --log-level warn that may take hours.
        await asyncio.sleep(3)
        os.kill(os.getpid(), signal.SIGKILL)


    asyncio.run(main())
    """
)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _dev_servers_on(db_file: Path) -> list[int]:
    """The running ``temporal server start-dev`` processes on ``db_file``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"start-dev" in argv and str(db_file).encode() in argv and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _answering(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _until_gone(pid: int, within: float) -> None:
    deadline = time.monotonic() + within
    while _alive(pid):
        assert time.monotonic() < deadline, f"dev server {pid} still runs {within} s after its parent died"
        time.sleep(0.1)


@contextlib.contextmanager
def _no_dev_server_left(*db_files: Path) -> Iterator[None]:
    """Whatever the test does (or the old code leaves), kill the dev servers on these files at the end."""
    try:
        yield
    finally:
        for db_file in db_files:
            for pid in _dev_servers_on(db_file):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _leave_behind(port: int, db_file: Path) -> int:
    """A dev server on ``port`` and ``db_file``, started the way orderstream starts it
    (pid file included) but without the parent death signal, by a process then
    killed with SIGKILL: an orphan, as an older orderstream left it. Its pid."""
    done = subprocess.run(
        [sys.executable, "-c", LEAVE_BEHIND, str(port), str(db_file)],
        env=cli_env(),
        cwd=ROOT,
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    [pid] = _dev_servers_on(db_file)
    assert (db_file.parent / PID_FILE).read_text() == f"{pid}\n"
    assert _alive(pid)
    assert _answering(port)
    return pid


def test_a_killed_worker_takes_its_dev_server_along(tmp_path: Path) -> None:
    dev_port, metrics_port = free_port(), free_port()
    data = tmp_path / "data"
    env = cli_env(
        ORDERSTREAM_TEMPORAL_DEV_PORT=str(dev_port),
        ORDERSTREAM_TEMPORAL_UI_PORT=str(free_port()),
        ORDERSTREAM_METRICS_PORT=str(metrics_port),
    )
    argv = [sys.executable, "-m", "orderstream.cli", "worker", "--data-dir", str(data)]
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    with (
        _no_dev_server_left(data / "temporal.db"),
        running(argv, tmp_path / "worker.log", metrics, name="worker", env=env) as worker,
    ):
        [dev_server] = _dev_servers_on(data / "temporal.db")

        worker.kill()  # SIGKILL: no shutdown of ours runs
        worker.wait()
        _until_gone(dev_server, 5)
        deadline = time.monotonic() + 2  # its threads may still be exiting
        while _answering(dev_port):
            assert time.monotonic() < deadline, f"127.0.0.1:{dev_port} still answers"
            time.sleep(0.1)
        # Its pid was recorded (a kill -9 leaves the file: the next start finds nothing there).
        pid_file = data / PID_FILE
        assert pid_file.read_text() == f"{dev_server}\n"
        assert pid_file.stat().st_mode & 0o777 == 0o600

    # What a supervisor's restart does next: it starts.
    with (
        _no_dev_server_left(data / "temporal.db"),
        running(argv, tmp_path / "worker-again.log", metrics, name="worker", env=env),
    ):
        [again] = _dev_servers_on(data / "temporal.db")
        assert again != dev_server
        assert (data / PID_FILE).read_text() == f"{again}\n"


def test_a_killed_serve_takes_its_dev_server_along(tmp_path: Path) -> None:
    """An orphan dies by itself at its next line of output into serve's closed pipe
    (SIGPIPE): on the old code it survived when it had nothing more to say. So the
    saga worker runs in serve's own process (a worker process of its own outlives serve
    for a moment, and the dev server may log its going), and serve is killed after the
    dev server's start-up output."""
    db_file = tmp_path / "data" / "temporal.db"
    in_process = {"ORDERSTREAM_SAGA_WORKER_PROCESSES": "0"}
    with _no_dev_server_left(db_file), served(tmp_path, extra_env=in_process) as serve:
        [dev_server] = _dev_servers_on(db_file)
        time.sleep(3)
        serve.process.kill()
        serve.process.wait()
        _until_gone(dev_server, 5)


def test_a_dev_server_left_behind_on_this_data_dir_is_stopped_and_orders_ship(tmp_path: Path) -> None:
    dev_port = free_port()
    db_file = tmp_path / "data" / "temporal.db"
    with _no_dev_server_left(db_file):
        orphan = _leave_behind(dev_port, db_file)
        with served(tmp_path, temporal_port=dev_port) as serve, serve.client() as client:
            assert not _alive(orphan)
            serve.place_and_ship(client)
            [dev_server] = _dev_servers_on(db_file)
            assert dev_server != orphan
            assert (db_file.parent / PID_FILE).read_text() == f"{dev_server}\n"
        log = serve.log.read_text()
        assert f"Temporal dev server left by a killed orderstream (pid {orphan})" in log
        assert log.count("left by a killed orderstream") == 1


def test_a_port_held_by_another_process_is_refused_in_one_line(tmp_path: Path) -> None:
    """The CLI says why it cannot start, in one line and a non-zero status; the process
    that the pid file names (not a dev server) and the one on the port are left alone."""
    data = tmp_path / "data"
    data.mkdir()
    with (
        socket.socket() as taken,
        subprocess.Popen(["sleep", "60"]) as stranger,
    ):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (data / PID_FILE).write_text(f"{stranger.pid}\n")
        env = cli_env(ORDERSTREAM_TEMPORAL_DEV_PORT=str(port), ORDERSTREAM_TEMPORAL_UI_PORT=str(free_port()))
        done = subprocess.run(
            [sys.executable, "-m", "orderstream.cli", "worker", "--data-dir", str(data)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert stranger.poll() is None
        stranger.kill()
    stderr = done.stderr.decode()
    assert done.returncode != 0
    assert "Traceback" not in stderr
    plain = [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert plain == [
        f"Error: the Temporal dev server did not start: 127.0.0.1:{port} is in use by another process, "
        "not a dev server left behind on this data dir: stop it or choose another port "
        "(ORDERSTREAM_TEMPORAL_DEV_PORT)"
    ], stderr


async def test_a_dev_server_left_behind_on_another_data_dir_is_refused_and_left_alone(tmp_path: Path) -> None:
    """Even when our pid file names it (copied, or a pid reused): its command line names
    another ``temporal.db``, so it is not ours to stop."""
    port = free_port()
    theirs, ours = tmp_path / "theirs" / "temporal.db", tmp_path / "ours" / "temporal.db"
    with _no_dev_server_left(theirs):
        orphan = _leave_behind(port, theirs)
        ours.parent.mkdir()
        (ours.parent / PID_FILE).write_text(f"{orphan}\n")
        server = SupervisedDevServer(DevServerConfig(port=port, ui_port=None, db_file=ours))
        with pytest.raises(DevServerExited, match="in use by another process, not a dev server left behind"):
            await server.start()
        assert server.process is None
        assert _alive(orphan)
        assert _answering(port)


async def test_the_dev_server_of_a_running_orderstream_on_this_data_dir_is_refused(tmp_path: Path) -> None:
    """Two processes started on one data dir: the second is refused, the first one's
    dev server keeps running (its parent is alive: it was not left behind)."""
    config = DevServerConfig(port=free_port(), ui_port=None, db_file=tmp_path / "temporal.db")
    first = SupervisedDevServer(config)
    await first.start()
    try:
        second = SupervisedDevServer(config)
        refused = r"in use by the Temporal dev server \(pid \d+\) of another orderstream"
        with pytest.raises(DevServerExited, match=refused):
            await second.start()
        assert first.pid is not None
        assert _alive(first.pid)
        assert (tmp_path / PID_FILE).read_text() == f"{first.pid}\n"
    finally:
        await first.stop_now()
    assert not (tmp_path / PID_FILE).exists()
