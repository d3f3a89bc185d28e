"""A cancelled order shows Completed with outcome ``cancelled`` in the Temporal Web UI.

The module's ``temporal_env`` is a dev server with its Web UI on (on free
ports), so ``make_saga`` runs on it. The UI is asked twice: through the HTTP API
its pages call (``/api/v1/namespaces/default/workflows?query=...``, what the
list's filter runs), and, when Debian's ``chromium`` is installed, by loading the
filtered list page in headless Chromium and reading the DOM it rendered.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from orderstream.sagas.fulfilment.inputs import SEARCH_ATTRIBUTES
from orderstream.sagas.runtime import NAMESPACE, TemporalBinaryNotFound, start_dev_server, temporal_cli_path
from tests.sagas.conftest import WAIT, SagaFactory, eventually

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]

COMPLETED = "WORKFLOW_EXECUTION_STATUS_COMPLETED"
STATUS_CELL = re.compile(r'data-testid="execution-status"[^>]*>.*?<span>(\w+)')
"""The status cell of a row of the UI's workflow list (UI 2.54), and its text."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def ui_port() -> int:
    return _free_port()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def temporal_env(
    ui_port: int, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[WorkflowEnvironment]:
    try:
        temporal_cli_path()
    except TemporalBinaryNotFound as exc:
        pytest.skip(str(exc))
    data_dir = tmp_path_factory.mktemp("temporal-ui")
    _address, env = await start_dev_server(
        data_dir, port=None, ui=True, ui_port=ui_port, search_attributes=SEARCH_ATTRIBUTES
    )
    try:
        yield env
    finally:
        await env.shutdown()


async def _listed(ui: httpx.AsyncClient, query: str) -> list[dict[str, Any]] | None:
    """What the UI's workflow list shows for ``query``; ``None`` while the UI
    server answers 503 (its connection to the frontend is not up, seen once on
    a busy machine)."""
    answer = await ui.get(f"/api/v1/namespaces/{NAMESPACE}/workflows", params={"query": query})
    if answer.status_code == 503:
        return None
    answer.raise_for_status()
    executions: list[dict[str, Any]] = answer.json().get("executions") or []
    return executions


async def _cancelled_order(make_saga: SagaFactory) -> tuple[str, str]:
    """An order the customer cancelled while its payment was pending, its saga
    ended; returns its workflow id and the UI's filter for it by outcome."""
    saga = await make_saga(search_attributes=True)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 2))
    await saga.reach_step(order_id, "await-payment-result")
    await saga.container.use_cases.cancel_order(order_id, "changed my mind", saga.ctx)
    assert (await saga.outcome(order_id)).status == "cancelled"
    workflow_id = saga.handle(order_id).id
    return workflow_id, f'OrderOutcome="cancelled" AND WorkflowId="{workflow_id}"'


async def test_the_web_ui_lists_a_cancelled_order_completed_under_its_outcome(
    make_saga: SagaFactory, ui_port: int
) -> None:
    workflow_id, query = await _cancelled_order(make_saga)

    shown: dict[str, list[dict[str, Any]]] = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ui_port}", timeout=WAIT) as ui:

        async def listed() -> bool:
            by_outcome = await _listed(ui, query)
            failed = await _listed(ui, f'ExecutionStatus="Failed" AND WorkflowId="{workflow_id}"')
            if not by_outcome or failed is None:
                return False
            shown.update(by_outcome=by_outcome, failed=failed)
            return True

        await eventually(listed, what="the Web UI to list the cancelled order")

    (execution,) = shown["by_outcome"]
    failed = shown["failed"]
    assert execution["execution"]["workflowId"] == workflow_id
    assert execution["status"] == COMPLETED
    assert failed == []  # the UI's Failures filter does not count it
    outcome = execution["searchAttributes"]["indexedFields"]["OrderOutcome"]["data"]
    assert json.loads(base64.b64decode(outcome)) == "cancelled"  # the payload the UI shows


async def test_the_rendered_web_ui_page_shows_it_completed(
    make_saga: SagaFactory, ui_port: int, tmp_path: Path
) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: the page is not rendered")
    workflow_id, query = await _cancelled_order(make_saga)
    url = f"http://127.0.0.1:{ui_port}/namespaces/{NAMESPACE}/workflows?query={quote(query)}"

    dom = await _rendered(chromium, url, tmp_path)

    # One row, linking to the run, its status cell saying Completed.
    assert f'href="/namespaces/{NAMESPACE}/workflows/{workflow_id}/' in dom
    assert STATUS_CELL.findall(dom) == ["Completed"]


async def _rendered(chromium: str, url: str, tmp_path: Path) -> str:
    """The DOM headless Chromium rendered for ``url`` (its scripts given 15 s),
    with a screenshot beside it in ``tmp_path`` for a human to look at."""
    common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1600,1000",
        "--virtual-time-budget=15000",
    ]
    shot = await asyncio.create_subprocess_exec(
        chromium,
        *common,
        f"--screenshot={tmp_path / 'ui.png'}",
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.wait_for(shot.wait(), 120)
    proc = await asyncio.create_subprocess_exec(
        chromium,
        *common,
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return out.decode(errors="replace")
