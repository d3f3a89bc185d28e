#!/usr/bin/env bash
# A real single-node Elasticsearch (8.19, from Maven Central artifacts) for
# development and tests. No Docker, no download outside Maven Central.
#
#   infra/elasticsearch/dev-node.sh start    build if needed, start in the background,
#                                            wait until it answers, print its URL (last stdout line)
#   infra/elasticsearch/dev-node.sh stop     stop it (pid file)
#   infra/elasticsearch/dev-node.sh status   say whether it runs (exit 0 running, 3 not)
#
# Environment:
#   ES_PORT            HTTP port on 127.0.0.1 (default 9200)
#   ES_HOME_DIR        node home: data/, logs/, config/, node.pid (default infra/elasticsearch/.build/node)
#   ES_START_TIMEOUT   seconds to wait for HTTP (default 180)
#   ES_JAVA_OPTS       extra JVM options (appended)
#   ES_MVN_ARGS        extra Maven arguments, e.g. -Dmaven.repo.local=/tmp/m2
#   JAVA_HOME          Java 17+ (default: java on PATH)
#
# Progress and messages go to stderr; stdout carries only the URL.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD_DIR="$HERE/.build"
TARGET="$BUILD_DIR/target"
ES_PORT="${ES_PORT:-9200}"
ES_HOME_DIR="${ES_HOME_DIR:-$BUILD_DIR/node}"
case "$ES_HOME_DIR" in /*) ;; *) ES_HOME_DIR="$PWD/$ES_HOME_DIR" ;; esac
ES_START_TIMEOUT="${ES_START_TIMEOUT:-180}"
PID_FILE="$ES_HOME_DIR/node.pid"
PORT_FILE="$ES_HOME_DIR/node.port"
LOG_FILE="$ES_HOME_DIR/logs/dev-node.log"
URL="http://127.0.0.1:$ES_PORT"
MAIN_CLASS="org.elasticsearch.node.DevNode"

if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then JAVA="$JAVA_HOME/bin/java"; else JAVA="java"; fi

say() { printf '%s\n' "$*" >&2; }
die() { say "dev-node: $*"; exit 1; }

# 0 when something answers HTTP on $URL with the Elasticsearch product header
http_ok() {
  if command -v curl >/dev/null 2>&1; then
    curl -s -m 3 -o /dev/null -D - "$URL/" 2>/dev/null | tr -d '\r' | grep -qi '^x-elastic-product: *Elasticsearch'
  else
    python3 - "$URL/" <<'PY' 2>/dev/null
import sys, urllib.request
r = urllib.request.urlopen(sys.argv[1], timeout=3)
sys.exit(0 if r.headers.get("X-Elastic-Product") == "Elasticsearch" else 1)
PY
  fi
}

# 0 when something (anything) accepts TCP connections on the port
port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$ES_PORT") 2>/dev/null
}

# pid of our running node, or nothing
running_pid() {
  [ -f "$PID_FILE" ] || return 0
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$MAIN_CLASS"; then
    echo "$pid"
  fi
}

build() {
  command -v "$JAVA" >/dev/null 2>&1 || die "java not found (need Java 17+; set JAVA_HOME)"
  local major
  major="$("$JAVA" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
  [ "${major:-0}" -ge 17 ] 2>/dev/null || die "Java 17+ needed, $JAVA is ${major:-unknown}"
  local stamp
  stamp="$(cd "$HERE" && { cat pom.xml; find src -type f | LC_ALL=C sort | xargs cat; echo "java $major"; } | sha256sum | cut -d' ' -f1)"
  if [ -f "$BUILD_DIR/build.stamp" ] && [ "$(cat "$BUILD_DIR/build.stamp")" = "$stamp" ] \
     && [ -d "$TARGET/classes" ] && [ -d "$TARGET/lib" ]; then
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found (Maven 3.8+ is needed for the first build)"
  mkdir -p "$BUILD_DIR"
  say "dev-node: building (the first run downloads ~60 MB from Maven Central) ..."
  rm -rf "$TARGET/lib"
  # shellcheck disable=SC2086
  if ! mvn -B -q -f "$HERE/pom.xml" ${ES_MVN_ARGS:-} compile >"$BUILD_DIR/mvn.log" 2>&1; then
    tail -n 40 "$BUILD_DIR/mvn.log" >&2
    die "Maven build failed; full output in $BUILD_DIR/mvn.log"
  fi
  echo "$stamp" >"$BUILD_DIR/build.stamp"
}

# a running node keeps the port it was started with
use_running_port() {
  local p
  p="$(cat "$PORT_FILE" 2>/dev/null || true)"
  if [ -n "$p" ] && [ "$p" != "$ES_PORT" ]; then
    say "dev-node: the node in $ES_HOME_DIR runs on port $p (not ES_PORT=$ES_PORT)"
    ES_PORT="$p"
    URL="http://127.0.0.1:$ES_PORT"
  fi
}

start() {
  local pid
  pid="$(running_pid)"
  if [ -n "$pid" ]; then
    use_running_port
  else
    rm -f "$PID_FILE"
    if port_busy; then
      if http_ok; then
        die "an Elasticsearch not started by this script (no pid file in $ES_HOME_DIR) already answers on $URL; stop it or set ES_PORT"
      fi
      die "port $ES_PORT on 127.0.0.1 is in use by another program; set ES_PORT"
    fi
    build
    mkdir -p "$ES_HOME_DIR/logs" "$ES_HOME_DIR/tmp"
    {
      echo "=== dev-node start $(date -u +%FT%TZ) port $ES_PORT home $ES_HOME_DIR"
    } >>"$LOG_FILE"
    # shellcheck disable=SC2086
    nohup setsid "$JAVA" \
      -Xms1g -Xmx1g -XX:+UseG1GC -Xss1m \
      -XX:+HeapDumpOnOutOfMemoryError -XX:HeapDumpPath="$ES_HOME_DIR/logs" \
      -Djava.io.tmpdir="$ES_HOME_DIR/tmp" -Dfile.encoding=UTF-8 -Djava.awt.headless=true \
      -Dio.netty.noUnsafe=true -Dio.netty.noKeySetOptimization=true -Dio.netty.recycler.maxCapacityPerThread=0 \
      -Dlog4j.shutdownHookEnabled=false -Dlog4j2.disable.jmx=true -Dlog4j2.formatMsgNoLookups=true \
      -Djava.locale.providers=CLDR \
      ${ES_JAVA_OPTS:-} \
      -cp "$TARGET/classes:$TARGET/lib/*" "$MAIN_CLASS" "$ES_HOME_DIR" "$ES_PORT" \
      >>"$LOG_FILE" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PID_FILE"
    echo "$ES_PORT" >"$PORT_FILE"
    say "dev-node: started pid $pid, log $LOG_FILE"
  fi

  printf 'dev-node: waiting for %s ' "$URL" >&2
  local waited=0
  while ! http_ok; do
    if ! kill -0 "$pid" 2>/dev/null; then
      say ""
      tail -n 30 "$LOG_FILE" >&2 || true
      rm -f "$PID_FILE"
      die "the node exited before answering HTTP; see $LOG_FILE"
    fi
    if [ "$waited" -ge "$ES_START_TIMEOUT" ]; then
      say ""
      tail -n 30 "$LOG_FILE" >&2 || true
      die "no HTTP answer from $URL after ${ES_START_TIMEOUT}s (pid $pid still running; '$0 stop' to stop it); see $LOG_FILE"
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
    say "dev-node: not running"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "dev-node: pid $pid did not stop in 30s, killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PID_FILE" "$PORT_FILE"
  say "dev-node: stopped (pid $pid)"
}

status() {
  local pid
  pid="$(running_pid)"
  if [ -z "$pid" ]; then
    echo "dev-node: not running"
    return 3
  fi
  use_running_port
  if http_ok; then
    echo "dev-node: running, pid $pid, $URL"
  else
    echo "dev-node: pid $pid running but $URL does not answer (yet); see $LOG_FILE"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) say "usage: $0 start|stop|status"; exit 2 ;;
esac
