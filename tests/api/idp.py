"""The identity providers the auth suite runs against, behind one interface.

- ``local``: the local issuer (a key in the server's data dir), always.
- ``keycloak``: the real Keycloak of ``infra/keycloak/dev-idp.sh`` (``make test``
  starts it) at ``ORDERSTREAM_TEST_KEYCLOAK_URL``; tokens come from its token
  endpoint (password grant of the public ``orderstream-cli`` client) for the users
  of ``infra/keycloak/realm.json``; skipped when the variable is unset.

Both know the same users: ``alice`` and ``bob`` (customers ``cust-alice`` and
``cust-bob``), ``sam`` (support), ``ivy`` (inventory) and ``ada`` (admin).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.tokens import token_for

KEYCLOAK_ENV = "ORDERSTREAM_TEST_KEYCLOAK_URL"
KEYCLOAK_HOW = f"no Keycloak: set {KEYCLOAK_ENV} (infra/keycloak/dev-idp.sh start prints it; make test does)"
REALM = "orderstream"
CLIENT_ID = "orderstream-cli"

USERS: dict[str, tuple[str, str | None]] = {
    "alice": ("customer", "cust-alice"),
    "bob": ("customer", "cust-bob"),
    "sam": ("support", None),
    "ivy": ("inventory", None),
    "ada": ("admin", None),
}


@dataclass
class IdP:
    name: str
    data_dir: Path
    """The data dir of the app under test (the local issuer keeps its key there)."""
    keycloak_url: str | None = None

    @property
    def issuer(self) -> str | None:
        return f"{self.keycloak_url}/realms/{REALM}" if self.keycloak_url else None

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """``make_client`` keyword arguments for an app that trusts this IdP."""
        return {"data_dir": self.data_dir, "auth_issuer": self.issuer, **overrides}

    async def token(self, user: str) -> str:
        role, customer_id = USERS[user]
        if self.keycloak_url is None:
            return token_for(self.data_dir, role, customer_id=customer_id, subject=user)
        async with httpx.AsyncClient(timeout=30) as http:
            answer = await http.post(
                f"{self.issuer}/protocol/openid-connect/token",
                data={
                    "grant_type": "password",
                    "client_id": CLIENT_ID,
                    "username": user,
                    "password": f"{user}-password",
                    "scope": "openid",
                },
            )
        answer.raise_for_status()
        return str(answer.json()["access_token"])

    async def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.token(user)}"}


def keycloak_url() -> str | None:
    url = os.environ.get(KEYCLOAK_ENV)
    return url.rstrip("/") if url else None


async def _admin(http: httpx.AsyncClient, password: str) -> dict[str, str]:
    """``Authorization`` of Keycloak's ``admin`` (master realm) for the admin REST API."""
    login = await http.post(
        "/realms/master/protocol/openid-connect/token",
        data={"grant_type": "password", "client_id": "admin-cli", "username": "admin", "password": password},
    )
    login.raise_for_status()
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def rotate_keycloak_key(base_url: str, *, admin_password: str = "admin") -> str:
    """Add a new RS256 key to the realm with a higher priority than any other, so
    Keycloak signs new tokens with it (a key rotation); returns its ``kid``."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        admin = await _admin(http, admin_password)
        before = await http.get(f"/admin/realms/{REALM}/keys", headers=admin)
        before.raise_for_status()
        top = max(int(k.get("providerPriority", 0)) for k in before.json()["keys"])
        created = await http.post(
            f"/admin/realms/{REALM}/components",
            headers=admin,
            json={
                "name": f"rotated-{top + 1}",
                "providerId": "rsa-generated",
                "providerType": "org.keycloak.keys.KeyProvider",
                "parentId": REALM,
                "config": {
                    "priority": [str(top + 1)],
                    "active": ["true"],
                    "enabled": ["true"],
                    "algorithm": ["RS256"],
                },
            },
        )
        created.raise_for_status()
        after = await http.get(f"/admin/realms/{REALM}/keys", headers=admin)
        after.raise_for_status()
        active = after.json()["active"]
        return str(active["RS256"])


async def delete_keycloak_key(base_url: str, kid: str, *, admin_password: str = "admin") -> None:
    """Delete the realm's key ``kid`` (its key provider component): what an operator
    does with a key that leaked."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        admin = await _admin(http, admin_password)
        keys = await http.get(f"/admin/realms/{REALM}/keys", headers=admin)
        keys.raise_for_status()
        (provider,) = {k["providerId"] for k in keys.json()["keys"] if k.get("kid") == kid}
        deleted = await http.delete(f"/admin/realms/{REALM}/components/{provider}", headers=admin)
        deleted.raise_for_status()
