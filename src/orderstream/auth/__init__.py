"""Identity and access: who calls (a verified JWT) and what they may do (roles).

- :mod:`.principal`: the caller as the API sees it (subject, roles, customer id).
- :mod:`.verifier`: checks a bearer token (signature, ``iss``, ``aud``, ``exp``/``nbf``)
  against the issuer's keys: a Keycloak realm's JWKS, or the local issuer's key.
- :mod:`.local_issuer`: the signing key kept in the data dir when no issuer is
  configured, and ``orderstream tokens issue``.
- :mod:`.policy`: the route table (operation -> roles), the one check that enforces it
  (run by the API's request middleware), customer scoping and the per-identity write
  rate limit.
"""
