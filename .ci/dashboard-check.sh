#!/usr/bin/env bash
# Checks the operations files against a running gateway:
#  - .env.example lists every setting of src/config.rs with its default, and
#    docker-compose.yml passes each one on (.ci/env_check.py);
#  - docker-compose.yml parses (docker compose / docker-compose config -q);
#  - deploy/prometheus/prometheus.yml parses (promtool);
#  - dashboards/embgate.json is importable, and every PromQL expression in it
#    parses and returns data from a real Prometheus scraping a real gateway
#    (in front of the fake vendor, on the Redis at 127.0.0.1:6379 db 0) that
#    has served some traffic.
# Run from anywhere: bash .ci/dashboard-check.sh
# DASHBOARD_CHECK_ALLOW_EMPTY=REGEX lets expressions matching REGEX come back
# empty (see .ci/promql_check.py --allow-empty).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "dashboard-check: $*"; }
DUMP_LOGS=0
die() {
  echo "dashboard-check: $*" >&2
  DUMP_LOGS=1
  exit 1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/embgate-dash.XXXXXX")
PREFIX="embgate-ci-dash-$$"
PIDS=()

cleanup() {
  local status=$?
  set +e
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill "$pid" 2>/dev/null; done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do wait "$pid" 2>/dev/null; done
  if command -v redis-cli >/dev/null; then
    # Only this run's keys; never FLUSHALL/FLUSHDB: the Redis is shared.
    redis-cli -h 127.0.0.1 -p 6379 -n 0 --scan --pattern "$PREFIX:*" |
      xargs -r redis-cli -h 127.0.0.1 -p 6379 -n 0 del >/dev/null
  fi
  if [ "$DUMP_LOGS" = 1 ]; then
    for f in "$WORK"/*.log; do
      [ -s "$f" ] || continue
      echo "---- last lines of $(basename "$f")" >&2
      tail -n 20 "$f" >&2
    done
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

apt_install() {
  command -v apt-get >/dev/null || return 1
  DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Waits up to $2 tenths of a second for command $1 to succeed.
wait_for() {
  local tries=$2
  while ! eval "$1" >/dev/null 2>&1; do
    tries=$((tries - 1))
    [ "$tries" -gt 0 ] || return 1
    sleep 0.1
  done
}

# ---- .env.example and the compose file --------------------------------------
python3 .ci/env_check.py >"$WORK/env.out" || {
  cat "$WORK/env.out"
  die ".env.example or docker-compose.yml does not follow src/config.rs DEFAULTS"
}
log ".env.example: every setting of src/config.rs, with its default"

compose=()
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
elif apt_install docker-compose && command -v docker-compose >/dev/null; then
  compose=(docker-compose)
fi
if [ ${#compose[@]} -gt 0 ]; then
  # An empty env file instead of any .env: the file must stand on its defaults.
  : >"$WORK/empty.env"
  "${compose[@]}" --project-directory . --env-file "$WORK/empty.env" -f docker-compose.yml config -q ||
    die "docker-compose.yml does not validate (${compose[*]} config)"
  log "docker-compose.yml: valid (${compose[*]})"
else
  log "WARNING: neither 'docker compose' nor docker-compose is available; docker-compose.yml not validated"
fi

# ---- Prometheus ------------------------------------------------------------
if ! command -v prometheus >/dev/null; then
  log "installing Debian's prometheus"
  apt_install prometheus || die "cannot install prometheus"
fi
if command -v promtool >/dev/null; then
  promtool check config deploy/prometheus/prometheus.yml >/dev/null ||
    die "deploy/prometheus/prometheus.yml: promtool check config failed"
  log "deploy/prometheus/prometheus.yml: valid"
fi

# ---- the dashboard's structure (fast, before building anything) -------------
python3 .ci/promql_check.py dashboards/embgate.json >"$WORK/structure.out" ||
  {
    cat "$WORK/structure.out"
    die "dashboards/embgate.json: structure check failed"
  }
log "dashboards/embgate.json: structure valid"

# ---- a gateway with some traffic -------------------------------------------
(exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG) 2>/dev/null ||
  die "no Redis answers on 127.0.0.1:6379 (.ci/run starts one)"

log "building"
cargo build --bins -p embgate -p fake-vendor

# Slow vendor answers give concurrent requests for one input time to coalesce.
target/debug/fake-vendor --listen 127.0.0.1:0 --latency-ms 300 >"$WORK/vendor.out" 2>"$WORK/vendor.log" &
PIDS+=($!)
wait_for "grep -q '^listening on ' '$WORK/vendor.out'" 100 || die "fake-vendor did not start"
VENDOR_URL=$(sed -n 's/^listening on //p' "$WORK/vendor.out" | head -n 1)

GW_PORT=$(free_port)
GW="http://127.0.0.1:$GW_PORT"
env EMBGATE__LISTEN="127.0.0.1:$GW_PORT" \
  EMBGATE__UPSTREAM__BASE_URL="$VENDOR_URL" \
  EMBGATE__UPSTREAM__API_KEY= \
  EMBGATE__STORE__URL=redis://127.0.0.1:6379/0 \
  EMBGATE__STORE__KEY_PREFIX="$PREFIX" \
  EMBGATE__STORE__TIMEOUT_MS=2000 \
  'EMBGATE__PRICES__ACME-EMBED-V1=0.05' \
  RUST_LOG=warn \
  target/debug/embgate serve >"$WORK/embgate.log" 2>&1 &
PIDS+=($!)

# A second gateway whose Redis is not there: it serves from the vendor and
# counts store errors, as a gateway does while Redis is down.
DEAD_REDIS_PORT=$(free_port)
GW2_PORT=$(free_port)
GW2="http://127.0.0.1:$GW2_PORT"
env EMBGATE__LISTEN="127.0.0.1:$GW2_PORT" \
  EMBGATE__UPSTREAM__BASE_URL="$VENDOR_URL" \
  EMBGATE__UPSTREAM__API_KEY= \
  EMBGATE__STORE__URL="redis://127.0.0.1:$DEAD_REDIS_PORT/0" \
  EMBGATE__STORE__KEY_PREFIX="$PREFIX" \
  RUST_LOG=error \
  target/debug/embgate serve >"$WORK/embgate-no-redis.log" 2>&1 &
PIDS+=($!)

wait_for "curl -sf '$GW/healthz'" 300 || die "embgate did not start"
wait_for "curl -sf '$GW2/healthz'" 300 || die "embgate (without Redis) did not start"
log "gateways on $GW and $GW2 (vendor $VENDOR_URL)"

PROM_PORT=$(free_port)
PROM="http://127.0.0.1:$PROM_PORT"
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: embgate
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$GW_PORT", "127.0.0.1:$GW2_PORT"]
EOF
prometheus --config.file="$WORK/prometheus.yml" \
  --storage.tsdb.path="$WORK/prometheus-data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" \
  --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
wait_for "curl -sf '$PROM/-/ready'" 300 || die "prometheus did not become ready"

# Samples of `up` per target so far (the smallest over the targets).
scrapes() {
  curl -sf --data-urlencode 'query=count_over_time(up{job="embgate"}[10m])' "$PROM/api/v1/query" |
    python3 -c 'import json, sys
r = json.load(sys.stdin)["data"]["result"]
print(int(min((float(x["value"][1]) for x in r), default=0)) if len(r) == 2 else 0)'
}
wait_scrapes() {
  local want=$(($(scrapes) + $1))
  wait_for "[ \$(scrapes) -ge $want ]" 300 || die "prometheus is not scraping the gateways"
}
wait_scrapes 2

# POSTs a body to $1/v1/embeddings and checks the status is $2.
post() {
  local code
  code=$(curl -s -o "$WORK/last-response.json" -w '%{http_code}' \
    -H 'Authorization: Bearer sk-test' -H 'Content-Type: application/json' \
    --data-binary "$3" "$1/v1/embeddings")
  [ "$code" = "$2" ] || {
    cat "$WORK/last-response.json" >&2
    die "POST $1/v1/embeddings $3: status $code, want $2"
  }
}

traffic() {
  local round=$1
  # Misses in round 1, hits (and one new miss) in round 2, for two models.
  post "$GW" 200 "{\"model\":\"text-embedding-3-small\",\"input\":[\"alpha one\",\"beta two\",\"gamma three\",\"new $round\"]}"
  post "$GW" 200 "{\"model\":\"acme-embed-v1\",\"input\":[\"alpha one\",\"delta four\",\"new $round\"]}"
  post "$GW" 200 '{"model":"text-embedding-3-small","input":"alpha one","encoding_format":"base64"}'
  # Concurrent requests for one new input: one fetch, the others coalesce.
  local pids=() i
  for i in 1 2 3; do
    post "$GW" 200 "{\"model\":\"text-embedding-3-small\",\"input\":[\"together $round\"]}" &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || die "a concurrent request failed"; done
  # A malformed request, and a model the vendor does not know (upstream 404).
  post "$GW" 400 '{"model":"text-embedding-3-small","input":'
  post "$GW" 404 '{"model":"no-such-model","input":["alpha one"]}'
  # Through the gateway without Redis: store errors.
  post "$GW2" 200 "{\"model\":\"text-embedding-3-small\",\"input\":[\"alpha one\",\"new $round\"]}"
  curl -s -o /dev/null "$GW/readyz"
  curl -s -o /dev/null "$GW2/readyz"
}

# A re-indexing job through the vendor's Batch API, on the first gateway's
# store: the ledger it writes is what the Batch API panel shows.
batch_warm() {
  printf '"batch alpha"\n"batch beta"\n"alpha one"\n' >"$WORK/batch.jsonl"
  env EMBGATE__UPSTREAM__BASE_URL="$VENDOR_URL" \
    EMBGATE__UPSTREAM__API_KEY= \
    EMBGATE__STORE__URL=redis://127.0.0.1:6379/0 \
    EMBGATE__STORE__KEY_PREFIX="$PREFIX" \
    EMBGATE__BATCH_API__POLL_MIN_MS=50 \
    EMBGATE__BATCH_API__POLL_MAX_MS=200 \
    RUST_LOG=warn \
    target/debug/embgate warm "$WORK/batch.jsonl" --batch-api --api-key sk-test --quiet \
    >"$WORK/warm-batch.log" 2>&1 || {
    cat "$WORK/warm-batch.log" >&2
    die "embgate warm --batch-api failed"
  }
}

log "sending traffic"
traffic 1
log "warming through the Batch API"
batch_warm
wait_scrapes 2
traffic 2
wait_scrapes 3

log "querying every dashboard expression"
allow=()
if [ -n "${DASHBOARD_CHECK_ALLOW_EMPTY:-}" ]; then
  allow=(--allow-empty "$DASHBOARD_CHECK_ALLOW_EMPTY")
fi
python3 .ci/promql_check.py dashboards/embgate.json --prometheus "$PROM" ${allow[@]+"${allow[@]}"}
