#!/bin/sh
# Imports infra/kibana/saved_objects.ndjson into Kibana (run by the kibana-setup service in
# docker-compose.yml, or by hand: KIBANA_URL=http://localhost:5601 sh infra/kibana/import.sh).
# The import endpoint answers 200 even when some objects fail, so the body is checked too.
set -eu

KIBANA_URL="${KIBANA_URL:-http://localhost:5601}"
here="$(cd "$(dirname "$0")" && pwd)"

response="$(curl -fsS -X POST "$KIBANA_URL/api/saved_objects/_import?overwrite=true" \
  -H 'kbn-xsrf: true' \
  --form "file=@$here/saved_objects.ndjson")"
echo "$response"

case "$response" in
  *'"success":true'*) echo "kibana saved objects imported" ;;
  *) echo "kibana saved objects import failed" >&2; exit 1 ;;
esac
