#!/usr/bin/env bash
# How the service's cost grows with the work, measured with wrk:
#   1. a cache hit against a PostgreSQL read (Redis bypassed), at 32 connections;
#   2. hits at 1, 8, 32, 128 and 512 concurrent connections;
#   3. PostgreSQL reads of random items in tables of 1k, 100k and 1M rows.
# It builds the service from this directory and runs it on the PostgreSQL and
# Redis that the tests use (DB_* and REDIS_*, same defaults), in a schema and
# key prefix of its own that it removes at the end, on ports 55101 and 55102.
# It needs go, curl, psql and redis-cli, and installs wrk if missing (apt-get).
#
# usage: ./loadtest.sh            env: DURATION=5 (seconds per measurement)
set -euo pipefail
cd "$(dirname "$0")"
DURATION=${DURATION:-5}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }

export DB_HOST=${DB_HOST:-localhost} DB_PORT=${DB_PORT:-5432} DB_NAME=${DB_NAME:-appdb} \
  DB_USER=${DB_USER:-appuser} DB_PASSWORD=${DB_PASSWORD:-secret} \
  REDIS_HOST=${REDIS_HOST:-localhost} REDIS_PORT=${REDIS_PORT:-6379}
SCHEMA=loadtest_$$ PREFIX=loadtest:$$:item:
TMP=$(mktemp -d)
pids=()
psqlq() { PGPASSWORD=$DB_PASSWORD psql -h "$DB_HOST" -p "$DB_PORT" -U "$DB_USER" -d "$DB_NAME" -qAt -v ON_ERROR_STOP=1 "$@"; }
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  psqlq -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" 2>/dev/null || true
  redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" --scan --pattern "$PREFIX*" |
    xargs -r redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" del >/dev/null 2>&1 || true
  rm -rf "$TMP"
}
trap cleanup EXIT

go build -o "$TMP/items" .
cat >"$TMP/random.lua" <<'EOF'
local ids = tonumber(os.getenv("IDS"))
math.randomseed(os.time())
request = function() return wrk.format("GET", "/items/" .. math.random(1, ids)) end
EOF

# serve PORT REDIS_PORT: the service with its log discarded (it is buffered,
# but at these rates it would still fill a disk).
serve() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    echo "port $1 is taken; stop what listens there, or edit the ports below" >&2; exit 1
  fi
  env PORT=$1 REDIS_PORT=$2 DB_SCHEMA=$SCHEMA CACHE_KEY_PREFIX=$PREFIX CACHE_TTL=600s LOG_LEVEL=warn \
    "$TMP/items" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -fs "localhost:$1/health" >/dev/null && return; sleep 0.1; done
  echo "the service on port $1 did not start" >&2; exit 1
}
# measure CONNS URL [IDS]: prints "requests/s p99"
measure() {
  local out
  out=$(IDS=${3:-1} wrk -t"$((($1 < 2) ? 1 : 2))" -c"$1" -d"${DURATION}s" --latency ${3:+-s "$TMP/random.lua"} "$2" 2>&1)
  printf '%s %s\n' "$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")"
}
rows() { # fill the table with N items
  psqlq -c "SET search_path TO $SCHEMA" -c "TRUNCATE items RESTART IDENTITY" \
    -c "INSERT INTO items (name, description) SELECT 'item ' || g, 'description of item ' || g FROM generate_series(1, $1) g" \
    -c "ANALYZE items"
}

CACHED=55101 UNCACHED=55102 NOREDIS=$((56000 + $$ % 1000))
serve $CACHED "$REDIS_PORT"
serve $UNCACHED $NOREDIS # nothing listens there: every read is a BYPASS, from PostgreSQL
rows 100000
curl -fs "localhost:$CACHED/items/1" >/dev/null # cached from now on

echo "## A hit against a PostgreSQL read (32 connections, ${DURATION} s each)"
echo "| read | requests/s | p99 |"
echo "|---|---|---|"
read -r rps p99 < <(measure 32 "http://localhost:$CACHED/items/1")
echo "| cache hit (GET /items/1) | $rps | $p99 |"
read -r rps p99 < <(measure 32 "http://localhost:$UNCACHED" 100000)
echo "| PostgreSQL read (random items of 100k, Redis bypassed) | $rps | $p99 |"
echo
echo "## Hits by concurrent connections"
echo "| connections | requests/s | p99 |"
echo "|---|---|---|"
for c in 1 8 32 128 512; do
  read -r rps p99 < <(measure "$c" "http://localhost:$CACHED/items/1")
  echo "| $c | $rps | $p99 |"
done
echo
echo "## PostgreSQL reads by table size (random items, Redis bypassed, 32 connections)"
echo "| rows | requests/s | p99 |"
echo "|---|---|---|"
for n in 1000 100000 1000000; do
  rows "$n"
  read -r rps p99 < <(measure 32 "http://localhost:$UNCACHED" "$n")
  echo "| $n | $rps | $p99 |"
done
