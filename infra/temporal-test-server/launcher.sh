#!/usr/bin/env bash
# Temporal's time-skipping test server (io.temporal:temporal-test-server from
# Maven Central) as the executable the Python SDK expects:
#
#   infra/temporal-test-server/launcher.sh build    fetch the jars with Maven (once; prints this script's path)
#   infra/temporal-test-server/launcher.sh <port> [args...]
#                                                   run io.temporal.testserver.TestServer on <port>
#
# Tests pass this script to WorkflowEnvironment.start_time_skipping(
# test_server_existing_path=...), which runs it with the port. The SDK would
# otherwise download a native build at run time, which can't work here.
#
# Environment: JAVA_HOME (Java 17+; default java on PATH), TEMPORAL_TS_MVN_ARGS
# (extra Maven arguments, e.g. -o or -Dmaven.repo.local=/tmp/m2).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LIB="$HERE/.build/target/lib"
if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then JAVA="$JAVA_HOME/bin/java"; else JAVA="java"; fi

built() { compgen -G "$LIB/temporal-test-server-*.jar" >/dev/null; }

if [ "${1:-}" = build ]; then
  if ! built; then
    # shellcheck disable=SC2086
    mvn -q -B -f "$HERE/pom.xml" ${TEMPORAL_TS_MVN_ARGS:-} package >&2
  fi
  built || { echo "launcher: Maven did not produce $LIB" >&2; exit 1; }
  echo "$HERE/launcher.sh"
  exit 0
fi

[ $# -ge 1 ] || { echo "usage: $0 build | <port> [args...]" >&2; exit 2; }
built || { echo "launcher: not built; run $0 build" >&2; exit 1; }
exec "$JAVA" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -cp "$LIB/*" io.temporal.testserver.TestServer "$@"
