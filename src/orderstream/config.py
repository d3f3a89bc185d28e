"""Settings from environment variables; every one can be overridden by a CLI option.

- ``ORDERSTREAM_DATA_DIR`` (``./data``): where the embedded SQLite files live.
- ``ORDERSTREAM_EVENT_STORE`` (``sqlite:///{data_dir}/events.db``): or
  ``kurrentdb://host:2113?tls=false`` / ``esdb://...``.
- ``ORDERSTREAM_READ_STORE`` (``sqlite:///{data_dir}/read.db``): or ``http(s)://host:9200``
  (Elasticsearch; ``?prefix=name-`` sets the index prefix).
- The sagas' variables (``TEMPORAL_ADDRESS``, ``ORDERSTREAM_TASK_QUEUE``, ...) are the saga
  package's settings: ``orderstream.sagas.fulfilment.settings``.
- ``ORDERSTREAM_AUTH`` (``on``): ``off`` turns authentication off (experiments only: a
  loud warning in the log and in ``/ready``). On, every route but ``/health``, ``/ready``
  and the OpenAPI document needs ``Authorization: Bearer <JWT>`` (see ``orderstream.auth``).
- ``ORDERSTREAM_AUTH_ISSUER`` (unset): the OIDC issuer URL (e.g. a Keycloak realm); its
  JWKS is found through ``{issuer}/.well-known/openid-configuration``. Unset: the local
  issuer, a signing key kept in ``{data_dir}/auth/`` (``orderstream tokens issue``).
- ``ORDERSTREAM_AUTH_JWKS_URL`` (unset): the issuer's JWKS address, when the API reaches
  the issuer under another name than the one in its tokens (containers).
- ``ORDERSTREAM_AUTH_AUDIENCE`` (``orderstream``): the ``aud`` a token must carry.
- ``ORDERSTREAM_AUTH_ROLES_CLAIM`` (``realm_access.roles``) and
  ``ORDERSTREAM_AUTH_CUSTOMER_CLAIM`` (``customer_id``, else ``sub``): where the roles and
  the customer id sit in the token's claims (dotted paths).
- ``ORDERSTREAM_METRICS_PUBLIC`` (``true``): ``false`` puts ``/metrics`` behind the admin role
  (on the API port and on the metrics port below alike).
- ``ORDERSTREAM_METRICS_PORT`` (unset: none) and ``ORDERSTREAM_METRICS_HOST``
  (``127.0.0.1``): where ``orderstream project`` and ``orderstream worker``, which
  serve no API, answer ``GET /metrics`` (``--metrics-port``, ``--metrics-host``; ``0``:
  a free port, announced). ``serve`` and ``api`` answer ``/metrics`` on their HTTP
  port and ignore them. See :mod:`orderstream.api.metrics_port`.
- ``ORDERSTREAM_WRITE_RATE_LIMIT`` (``120/minute``): writes one identity may make
  (admins are exempt: operators and load tools); ``off`` turns the limit off.
- ``ORDERSTREAM_API_TOKENS`` is gone (static tokens gave no roles): setting it is an error
  that says what to use instead.
- ``ORDERSTREAM_WEBHOOK_SECRET`` (unset): the secret the payment provider signs its
  webhook calls with (``secret1,secret2`` while rotating: either is accepted); unset,
  one is generated into ``{data_dir}/webhook-secret`` (mode 0600) on first use. See
  ``application/webhook_signature.py``.
- ``ORDERSTREAM_CONSISTENCY_TIMEOUT`` (``5``): seconds a query with ``min_position``
  waits for the projection.
- ``ORDERSTREAM_READ_TIMEOUT`` (``5``): seconds a read from Elasticsearch (a search, a
  document) may take; then it is an outage (503). Writes wait up to 30 s.
- ``ORDERSTREAM_MAX_BODY_BYTES`` (``65536``): larger request bodies get 413.
- ``ORDERSTREAM_HEADER_TIMEOUT`` (``10``), ``ORDERSTREAM_BODY_TIMEOUT`` (``10``),
  ``ORDERSTREAM_KEEP_ALIVE_TIMEOUT`` (``5``): seconds a connection may take to send a
  request head, a request body, and to start its next request; then it is closed
  (the body: 408). ``ORDERSTREAM_SEND_TIMEOUT`` (``15``): seconds an answer may wait
  for the client to read it; then the connection is aborted.
  ``ORDERSTREAM_MAX_CONNECTIONS`` (``0``, auto: the file-descriptor limit less 128):
  past it a new connection closes the longest-idle one (or else the one whose client
  has not read its answer for longest). See :mod:`orderstream.api.connections`.
- ``ORDERSTREAM_SNAPSHOT_EVERY`` (``100``): write an aggregate snapshot when a command
  leaves its stream this many events past the latest one; ``0`` turns snapshots off
  (no writes, and loads fold whole streams). See ``docs/snapshots.md``.
- ``ORDERSTREAM_API_WORKERS`` (``0``, auto): HTTP worker processes of ``orderstream
  api`` and ``serve`` (``--workers``); with more than 1 the first process serves no
  HTTP and runs the workers, which share the port and the SQLite files. Auto is 1
  for ``api`` and, where there are 2 cores or more, 2 for ``serve``: measured
  (issue 7), a worker beside the projections and sagas nearly tripled ``serve``'s
  POST rate, while ``api`` on 2 cores gained nothing steady from a second worker
  and paid more CPU per request (group commit batches one process's appends).

SQLite URLs follow the SQLAlchemy convention: everything after ``sqlite:///`` is
the path, so ``sqlite:///data/events.db`` is relative and ``sqlite:////srv/events.db``
absolute.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = "./data"
DEFAULT_CONSISTENCY_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 5.0
"""The Elasticsearch read store's own default too (``readstore/elasticsearch.py``)."""
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_SNAPSHOT_EVERY = 100
DEFAULT_METRICS_HOST = "127.0.0.1"
AUTO_API_WORKERS = 0
MAX_API_WORKERS = 64

EVENT_STORE_SCHEMES = ("sqlite", "kurrentdb", "esdb", "esdb+discover", "kurrentdb+discover")
READ_STORE_SCHEMES = ("sqlite", "http", "https")


DEFAULT_AUTH_AUDIENCE = "orderstream"
DEFAULT_ROLES_CLAIM = "realm_access.roles"
DEFAULT_CUSTOMER_CLAIM = "customer_id"
DEFAULT_WRITE_RATE_LIMIT = "120/minute"
RATE_PERIODS = ("second", "minute", "hour")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable."""


def env_switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "on", "yes"):
        return True
    if raw in ("0", "false", "off", "no"):
        return False
    raise ConfigError(f"{name}: expected on or off, got {raw!r}")


def parse_rate(raw: str) -> tuple[int, str] | None:
    """``"120/minute"`` -> ``(120, "minute")``; ``"off"`` -> ``None``."""
    if raw.strip().lower() in ("off", "0"):
        return None
    count, _, period = raw.strip().partition("/")
    if not count.isdigit() or int(count) < 1 or period not in RATE_PERIODS:
        raise ConfigError(
            f"ORDERSTREAM_WRITE_RATE_LIMIT: expected N/second, N/minute, N/hour or off, got {raw!r}"
        )
    return int(count), period


MIN_WEBHOOK_SECRET_LENGTH = 16


def parse_webhook_secrets(raw: str | None) -> tuple[str, ...]:
    """``"new, old"`` -> ``("new", "old")``: several while a secret is rotated."""
    found = tuple(part.strip() for part in (raw or "").split(",") if part.strip())
    if any(len(secret) < MIN_WEBHOOK_SECRET_LENGTH for secret in found):
        raise ConfigError(
            f"ORDERSTREAM_WEBHOOK_SECRET: each secret needs at least {MIN_WEBHOOK_SECRET_LENGTH} characters"
        )
    return found


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    """How long and how many: what a client connection may hold of the server."""

    header_timeout: float = 10.0
    body_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    send_timeout: float = 15.0
    """Seconds what the server has written may wait unsent for the client to read it
    (longer than the others: a slow link downloads, it does not only send a head)."""
    max_connections: int = 0
    """Open connections per process; 0: the file-descriptor limit less a reserve."""
    max_head_bytes: int = 32 * 1024
    """A request head (request line and header lines) larger than this gets 431 and
    the connection is closed: a bearer token of several KiB fits many times over."""

    def __post_init__(self) -> None:
        if not min(self.header_timeout, self.body_timeout, self.keep_alive_timeout, self.send_timeout) > 0:
            raise ConfigError("connection timeouts must be positive")
        if self.max_connections < 0:
            raise ConfigError("ORDERSTREAM_MAX_CONNECTIONS: must be 0 (auto) or positive")
        if self.max_head_bytes < 4096:
            raise ConfigError("ORDERSTREAM_MAX_HEAD_BYTES: at least 4096")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConnectionLimits:
        return cls(
            header_timeout=env_float(env, "ORDERSTREAM_HEADER_TIMEOUT", cls.header_timeout),
            body_timeout=env_float(env, "ORDERSTREAM_BODY_TIMEOUT", cls.body_timeout),
            keep_alive_timeout=env_float(env, "ORDERSTREAM_KEEP_ALIVE_TIMEOUT", cls.keep_alive_timeout),
            send_timeout=env_float(env, "ORDERSTREAM_SEND_TIMEOUT", cls.send_timeout),
            max_connections=env_int(env, "ORDERSTREAM_MAX_CONNECTIONS", 0, minimum=0),
            max_head_bytes=env_int(env, "ORDERSTREAM_MAX_HEAD_BYTES", cls.max_head_bytes, minimum=0),
        )


def scheme_of(url: str) -> str:
    scheme, sep, _rest = url.partition("://")
    return scheme.lower() if sep else ""


def sqlite_path(url: str) -> Path:
    """``sqlite:///data/x.db`` -> ``data/x.db``; ``sqlite:////abs/x.db`` -> ``/abs/x.db``."""
    prefix = "sqlite:///"
    if not url.lower().startswith(prefix) or len(url) == len(prefix):
        raise ConfigError(f"not a SQLite file URL (sqlite:///path): {url!r}")
    return Path(url[len(prefix) :])


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: not a number: {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"{name}: must be positive, got {raw!r}")
    return value


def env_int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int = 1, maximum: int | None = None
) -> int:
    """An integer of at least ``minimum`` (``minimum=0``: ``0`` means "off") and at most
    ``maximum``."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: not an integer: {raw!r}") from None
    if value < minimum:
        wanted = "0 (off) or positive" if minimum == 0 else f"at least {minimum}"
        raise ConfigError(f"{name}: must be {wanted}, got {raw!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}: must be at most {maximum}, got {raw!r}")
    return value


def env_port(env: Mapping[str, str], name: str) -> int | None:
    """A TCP port (``0``: a free one), or ``None`` when unset or empty."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: not a port number: {raw!r}") from None
    if not 0 <= value <= 65535:
        raise ConfigError(f"{name}: must be 0 to 65535, got {raw!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class Settings:
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    event_store_url: str = ""
    """Empty: ``sqlite:///{data_dir}/events.db``."""
    read_store_url: str = ""
    """Empty: ``sqlite:///{data_dir}/read.db``."""
    auth_enabled: bool = True
    """False: every caller is ``anonymous`` with every role (experiments only)."""
    auth_issuer: str | None = None
    """The OIDC issuer; ``None``: the local issuer (a key in ``{data_dir}/auth``)."""
    auth_jwks_url: str | None = None
    """``None``: ``jwks_uri`` of ``{auth_issuer}/.well-known/openid-configuration``."""
    auth_audience: str = DEFAULT_AUTH_AUDIENCE
    auth_roles_claim: str = DEFAULT_ROLES_CLAIM
    auth_customer_claim: str = DEFAULT_CUSTOMER_CLAIM
    metrics_public: bool = True
    metrics_host: str = DEFAULT_METRICS_HOST
    metrics_port: int | None = None
    """The metrics port of a process that serves no API (``project``, ``worker``);
    ``None``: none; 0: a free one."""
    write_rate_limit: str = DEFAULT_WRITE_RATE_LIMIT
    """``N/second|minute|hour`` per identity on writes, or ``off``."""
    consistency_timeout: float = DEFAULT_CONSISTENCY_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    """Seconds a read from Elasticsearch may take before it is an outage."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY
    """Events between aggregate snapshots; 0: no snapshots."""
    api_workers: int = AUTO_API_WORKERS
    """HTTP worker processes sharing the port (``--workers``); 0: see :meth:`workers_for`."""
    webhook_secrets: tuple[str, ...] = ()
    """Shared with the payment provider; empty: the data dir's (generated)."""
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)

    def __post_init__(self) -> None:
        # Fill the URL defaults from the data dir, then check what we were given.
        if not self.event_store_url:
            object.__setattr__(self, "event_store_url", f"sqlite:///{self.data_dir}/events.db")
        if not self.read_store_url:
            object.__setattr__(self, "read_store_url", f"sqlite:///{self.data_dir}/read.db")
        if scheme_of(self.event_store_url) not in EVENT_STORE_SCHEMES:
            raise ConfigError(
                f"ORDERSTREAM_EVENT_STORE: unsupported URL {self.event_store_url!r} "
                "(use sqlite:///path or kurrentdb://host:2113?tls=false)"
            )
        if scheme_of(self.read_store_url) not in READ_STORE_SCHEMES:
            raise ConfigError(
                f"ORDERSTREAM_READ_STORE: unsupported URL {self.read_store_url!r} "
                "(use sqlite:///path or http://host:9200)"
            )
        if not self.consistency_timeout > 0:
            raise ConfigError("consistency timeout must be positive")
        if not self.read_timeout > 0:
            raise ConfigError("ORDERSTREAM_READ_TIMEOUT: must be positive")
        if self.max_body_bytes <= 0:
            raise ConfigError("max body bytes must be positive")
        if self.snapshot_every < 0:
            raise ConfigError("ORDERSTREAM_SNAPSHOT_EVERY: must be 0 (off) or positive")
        parse_rate(self.write_rate_limit)
        if not self.auth_audience:
            raise ConfigError("ORDERSTREAM_AUTH_AUDIENCE: must not be empty")
        if self.auth_issuer is not None and scheme_of(self.auth_issuer) not in ("http", "https"):
            raise ConfigError(f"ORDERSTREAM_AUTH_ISSUER: not an http(s) URL: {self.auth_issuer!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"ORDERSTREAM_METRICS_PORT: must be 0 to 65535, got {self.metrics_port}")
        if not self.metrics_host.strip():
            raise ConfigError("ORDERSTREAM_METRICS_HOST: must not be empty")
        if not 0 <= self.api_workers <= MAX_API_WORKERS:
            raise ConfigError(f"ORDERSTREAM_API_WORKERS: must be 0 (auto) to {MAX_API_WORKERS}")

    def workers_for(self, *, serve: bool, cores: int | None = None) -> int:
        """The API worker processes to run: ``api_workers``, or when that is 0 (auto)
        1 for ``orderstream api`` and for ``serve`` 2 on a machine with 2 cores or
        more (``cores``: ``os.cpu_count()``), so that requests do not queue behind
        the projections and sagas on one event loop."""
        if self.api_workers != AUTO_API_WORKERS:
            return self.api_workers
        cores = (os.cpu_count() or 1) if cores is None else cores
        return 2 if serve and cores >= 2 else 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the environment, then apply ``overrides`` (CLI options; ``None`` = not given).

        A data dir given as an override also moves the default store URLs, unless
        those were set explicitly.
        """
        env = os.environ if env is None else env
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        if env.get("ORDERSTREAM_API_TOKENS"):
            raise ConfigError(
                "ORDERSTREAM_API_TOKENS is gone: tokens are now JWTs with roles. Unset it and use "
                "'orderstream tokens issue --role ROLE' (local issuer) or ORDERSTREAM_AUTH_ISSUER."
            )
        values: dict[str, Any] = {
            "data_dir": Path(env.get("ORDERSTREAM_DATA_DIR") or DEFAULT_DATA_DIR),
            "event_store_url": env.get("ORDERSTREAM_EVENT_STORE", ""),
            "read_store_url": env.get("ORDERSTREAM_READ_STORE", ""),
            "auth_enabled": env_switch(env, "ORDERSTREAM_AUTH", True),
            "auth_issuer": env.get("ORDERSTREAM_AUTH_ISSUER") or None,
            "auth_jwks_url": env.get("ORDERSTREAM_AUTH_JWKS_URL") or None,
            "auth_audience": env.get("ORDERSTREAM_AUTH_AUDIENCE") or DEFAULT_AUTH_AUDIENCE,
            "auth_roles_claim": env.get("ORDERSTREAM_AUTH_ROLES_CLAIM") or DEFAULT_ROLES_CLAIM,
            "auth_customer_claim": env.get("ORDERSTREAM_AUTH_CUSTOMER_CLAIM") or DEFAULT_CUSTOMER_CLAIM,
            "metrics_public": env_switch(env, "ORDERSTREAM_METRICS_PUBLIC", True),
            "metrics_host": (env.get("ORDERSTREAM_METRICS_HOST") or "").strip() or DEFAULT_METRICS_HOST,
            "metrics_port": env_port(env, "ORDERSTREAM_METRICS_PORT"),
            "write_rate_limit": env.get("ORDERSTREAM_WRITE_RATE_LIMIT") or DEFAULT_WRITE_RATE_LIMIT,
            "consistency_timeout": env_float(
                env, "ORDERSTREAM_CONSISTENCY_TIMEOUT", DEFAULT_CONSISTENCY_TIMEOUT
            ),
            "read_timeout": env_float(env, "ORDERSTREAM_READ_TIMEOUT", DEFAULT_READ_TIMEOUT),
            "max_body_bytes": env_int(env, "ORDERSTREAM_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            "snapshot_every": env_int(env, "ORDERSTREAM_SNAPSHOT_EVERY", DEFAULT_SNAPSHOT_EVERY, minimum=0),
            "api_workers": env_int(env, "ORDERSTREAM_API_WORKERS", AUTO_API_WORKERS, minimum=0),
            "webhook_secrets": parse_webhook_secrets(env.get("ORDERSTREAM_WEBHOOK_SECRET")),
            "connections": ConnectionLimits.from_env(env),
        }
        if "data_dir" in given:
            given["data_dir"] = Path(given["data_dir"])
        values.update(given)
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        """The settings without secrets (tokens shown as actors only)."""
        return {
            "data_dir": str(self.data_dir),
            "event_store": _redact(self.event_store_url),
            "read_store": _redact(self.read_store_url),
            "auth": self.auth_description(),
            "consistency_timeout": self.consistency_timeout,
            "read_timeout": self.read_timeout,
            "max_body_bytes": self.max_body_bytes,
            "snapshot_every": self.snapshot_every,
            "api_workers": self.api_workers,
            "metrics_port": None if self.metrics_port is None else f"{self.metrics_host}:{self.metrics_port}",
            "webhook_secret": f"{len(self.webhook_secrets)} from the environment"
            if self.webhook_secrets
            else "the data dir's",
            "connections": dataclasses.asdict(self.connections),
        }

    def auth_description(self) -> str:
        if not self.auth_enabled:
            return "OFF: every caller is anonymous with every role"
        issuer = self.auth_issuer or f"local issuer (key in {self.data_dir}/auth)"
        return f"JWT from {issuer}, audience {self.auth_audience!r}"


def _redact(url: str) -> str:
    """Hide a password in ``scheme://user:password@host``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
