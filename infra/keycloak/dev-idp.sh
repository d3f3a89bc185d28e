#!/usr/bin/env bash
# A real Keycloak (26.5, the keycloak-quarkus-dist zip from Maven Central) for
# development and tests, in dev mode (its embedded dev-file database, under the
# unpacked distribution's data/), with the realm of infra/keycloak/realm.json
# imported on first start. No Docker.
#
#   infra/keycloak/dev-idp.sh start    unpack if needed, start in the background, wait until
#                                      the realm answers, print its base URL (last stdout line)
#   infra/keycloak/dev-idp.sh stop     stop it (pid file)
#   infra/keycloak/dev-idp.sh status   say whether it runs (exit 0 running, 3 not)
#
# The issuer of the realm is "<URL>/realms/orderstream" (ORDERSTREAM_AUTH_ISSUER).
#
# Environment:
#   KC_PORT            HTTP port on 127.0.0.1 (default: 8180, or a free one if that is taken)
#   KC_HOME_DIR        logs/, idp.pid, idp.port (default infra/keycloak/.build/home)
#   KC_START_TIMEOUT   seconds to wait for the realm (default 240)
#   KC_ADMIN_PASSWORD  password of the master realm's "admin" (default "admin"; dev only)
#   KC_MVN_ARGS        extra Maven arguments, e.g. -Dmaven.repo.local=/tmp/m2
#   JAVA_HOME          Java 21+ (default: a Temurin 25 under /usr/lib/jvm, else java on PATH)
#
# Progress and messages go to stderr; stdout carries only the URL.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD_DIR="$HERE/.build"
DIST_DIR="$BUILD_DIR/dist"
KC_HOME_DIR="${KC_HOME_DIR:-$BUILD_DIR/home}"
case "$KC_HOME_DIR" in /*) ;; *) KC_HOME_DIR="$PWD/$KC_HOME_DIR" ;; esac
KC_START_TIMEOUT="${KC_START_TIMEOUT:-240}"
PID_FILE="$KC_HOME_DIR/idp.pid"
PORT_FILE="$KC_HOME_DIR/idp.port"
LOG_FILE="$KC_HOME_DIR/logs/dev-idp.log"
REALM="orderstream"
MAIN_CLASS="io.quarkus.bootstrap.runner.QuarkusEntryPoint"

say() { printf '%s\n' "$*" >&2; }
die() { say "dev-idp: $*"; exit 1; }

pick_java() {
  if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then return 0; fi
  local candidate
  for candidate in /usr/lib/jvm/temurin-25-jdk-amd64 /usr/lib/jvm/temurin-21-jdk-amd64 /usr/lib/jvm/java-21-openjdk-amd64; do
    if [ -x "$candidate/bin/java" ]; then export JAVA_HOME="$candidate"; return 0; fi
  done
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# 0 when the realm's discovery document answers on $URL
realm_ok() {
  local doc="$URL/realms/$REALM/.well-known/openid-configuration"
  if command -v curl >/dev/null 2>&1; then
    curl -sf -m 3 -o /dev/null "$doc" 2>/dev/null
  else
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$doc" 2>/dev/null
  fi
}

running_pid() {
  [ -f "$PID_FILE" ] || return 0
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -e "$MAIN_CLASS" -e "kc.sh"; then
    echo "$pid"
  fi
}

kc_dir() { find "$DIST_DIR" -maxdepth 1 -type d -name 'keycloak-*' 2>/dev/null | sort | tail -n 1; }

unpack() {
  local version
  version="$(sed -n 's:.*<keycloak.version>\(.*\)</keycloak.version>.*:\1:p' "$HERE/pom.xml")"
  if [ -x "$DIST_DIR/keycloak-$version/bin/kc.sh" ]; then return 0; fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found (Maven 3.8+ is needed for the first start)"
  mkdir -p "$BUILD_DIR"
  say "dev-idp: unpacking Keycloak $version (the first run downloads ~200 MB from Maven Central) ..."
  # shellcheck disable=SC2086
  if ! mvn -B -q -f "$HERE/pom.xml" ${KC_MVN_ARGS:-} package >"$BUILD_DIR/mvn.log" 2>&1; then
    tail -n 40 "$BUILD_DIR/mvn.log" >&2
    die "Maven failed; full output in $BUILD_DIR/mvn.log"
  fi
}

start() {
  local pid port
  pid="$(running_pid)"
  if [ -n "$pid" ]; then
    port="$(cat "$PORT_FILE")"
    URL="http://127.0.0.1:$port"
  else
    rm -f "$PID_FILE"
    port="${KC_PORT:-8180}"
    if port_busy "$port"; then
      [ -z "${KC_PORT:-}" ] || die "port $port on 127.0.0.1 is in use; set KC_PORT to a free one"
      port="$(free_port)"
    fi
    URL="http://127.0.0.1:$port"
    pick_java
    unpack
    local kc management
    kc="$(kc_dir)"
    management="$(free_port)"
    mkdir -p "$KC_HOME_DIR/logs" "$kc/data/import"
    cp "$HERE/realm.json" "$kc/data/import/realm-$REALM.json"
    echo "=== dev-idp start $(date -u +%FT%TZ) port $port home $KC_HOME_DIR" >>"$LOG_FILE"
    KC_BOOTSTRAP_ADMIN_USERNAME=admin KC_BOOTSTRAP_ADMIN_PASSWORD="${KC_ADMIN_PASSWORD:-admin}" \
    JAVA_OPTS_APPEND="-Xms256m -Xmx768m" \
      nohup setsid "$kc/bin/kc.sh" start-dev \
        --http-host=127.0.0.1 --http-port="$port" --http-management-port="$management" \
        --import-realm --hostname-strict=false \
        >>"$LOG_FILE" 2>&1 </dev/null &
    echo "$port" >"$PORT_FILE"
    pid=$!  # kc.sh builds, then execs the server's JVM under this pid
    echo "$pid" >"$PID_FILE"
    say "dev-idp: started pid $pid, log $LOG_FILE"
  fi
  printf 'dev-idp: waiting for %s/realms/%s ' "$URL" "$REALM" >&2
  local waited=0
  while ! realm_ok; do
    if ! kill -0 "$pid" 2>/dev/null; then
      say ""; tail -n 30 "$LOG_FILE" >&2 || true; rm -f "$PID_FILE"
      die "Keycloak exited before answering; see $LOG_FILE"
    fi
    if [ "$waited" -ge "$KC_START_TIMEOUT" ]; then
      say ""; tail -n 30 "$LOG_FILE" >&2 || true
      die "no answer from $URL after ${KC_START_TIMEOUT}s (pid $pid still running; '$0 stop' to stop it)"
    fi
    printf '.' >&2
    sleep 1
    waited=$((waited + 1))
  done
  say " up"
  echo "$URL"
}

stop() {
  local pid
  pid="$(running_pid)"
  if [ -z "$pid" ]; then
    rm -f "$PID_FILE"
    say "dev-idp: not running"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "dev-idp: pid $pid did not stop in 30s, killing it"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PID_FILE" "$PORT_FILE"
  say "dev-idp: stopped (pid $pid)"
}

status() {
  local pid
  pid="$(running_pid)"
  if [ -z "$pid" ]; then
    echo "dev-idp: not running"
    return 3
  fi
  URL="http://127.0.0.1:$(cat "$PORT_FILE")"
  if realm_ok; then
    echo "dev-idp: running, pid $pid, $URL (issuer $URL/realms/$REALM)"
  else
    echo "dev-idp: pid $pid running but $URL does not answer (yet); see $LOG_FILE"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) say "usage: $0 start|stop|status"; exit 2 ;;
esac
