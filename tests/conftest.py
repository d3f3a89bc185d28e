"""Shared fixtures: real stores in a temporary directory, the real app, a client.

- ``settings``: :class:`Settings` on ``tmp_path`` (embedded SQLite stores; auth on, with
  the local issuer whose key is created in the data dir).
- ``container``: ``await build(settings)``, closed after the test.
- ``app``: ``create_app(container)`` whose lifespan runs every projection runner.
- ``client``: an ``httpx.AsyncClient`` on the app (ASGI, same event loop, lifespan
  started and stopped around the test), sending an admin token of the app's local
  issuer (see ``tests/tokens.py``); ``client_for(app, token=None)`` sends none.
- ``make_client``: ``async with make_client(**settings) as (client, container)`` for
  other settings (each call gets its own data directory).

The app and its runners live in the test's own event loop (Litestar's
``AsyncTestClient`` would run them in a portal thread, a different loop than
the stores were opened in).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from orderstream.api.app import create_app
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.container import Container
from tests.tokens import admin_headers, bearer

BASE_URL = "http://orderstream.test"


@contextlib.asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    """Drive the ASGI lifespan protocol of ``app`` (startup before, shutdown after)."""
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))  # type: ignore[arg-type]
    await to_app.put({"type": "lifespan.startup"})
    started = await asyncio.wait_for(from_app.get(), 30)
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"app startup failed: {started}")
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(from_app.get(), 30)
        await asyncio.wait_for(task, 30)


ADMIN = "admin"


def _default_headers(app: Litestar, token: str | None) -> dict[str, str]:
    """An admin token of the app's local issuer for ``token=ADMIN`` (when auth is on
    and no external issuer is configured), ``token`` itself otherwise."""
    if token != ADMIN:
        return bearer(token) if token else {}
    settings: Settings = app.state["container"].settings
    if not settings.auth_enabled or settings.auth_issuer is not None:
        return {}
    return admin_headers(settings)


@contextlib.asynccontextmanager
async def client_for(app: Litestar, *, token: str | None = ADMIN) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app``: by default an admin's (``token=None``: anonymous)."""
    async with (
        lifespan(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
            base_url=BASE_URL,
            timeout=30,
            headers=_default_headers(app, token),
        ) as client,
    ):
        yield client


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
async def container(settings: Settings) -> AsyncIterator[Container]:
    built = await build(settings)
    try:
        yield built
    finally:
        await built.close()


@pytest.fixture
def app(container: Container) -> Litestar:
    # No extra routes: the fulfilment routes (and their Temporal client) have their own fixtures.
    return create_app(container, extra_route_handlers=(), background=container.projection_services)


@pytest.fixture
async def client(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as http:
        yield http


MakeClient = Callable[..., contextlib.AbstractAsyncContextManager[tuple[httpx.AsyncClient, Container]]]


@pytest.fixture
def make_client(tmp_path: Path) -> MakeClient:
    """``async with make_client(**settings_overrides) as (client, container)``;
    ``projections=False`` leaves the projection runners stopped; ``token=None``
    makes an anonymous client (default: an admin's)."""
    counter = itertools.count()

    @contextlib.asynccontextmanager
    async def make(
        *, projections: bool = True, token: str | None = ADMIN, **overrides: Any
    ) -> AsyncIterator[tuple[httpx.AsyncClient, Container]]:
        overrides.setdefault("data_dir", tmp_path / f"data-{next(counter)}")
        built = await build(Settings(**overrides))
        try:
            background = built.projection_services if projections else []
            application = create_app(built, extra_route_handlers=(), background=background)
            async with client_for(application, token=token) as http:
                yield http, built
        finally:
            await built.close()

    return make
