#!/usr/bin/env bash
# Real clients through the gateway: the official OpenAI Python SDK, LangChain's
# OpenAIEmbeddings, the official OpenAI Node SDK and the vendors' own Python
# SDKs (cohere, voyageai, google-genai, boto3) talk to `embgate serve`, which talks to
# `fake-vendor`. Each client script gets its own gateway with a
# fresh store: the embedded one in a temporary directory, or, with
# EMBGATE__STORE__URL set, a fresh key prefix on that Redis.
#
# Usage (from anywhere): tests/clients/run.sh
# Needs: cargo, python3 (with venv), node >= 20 with npm; with
# EMBGATE__STORE__URL, that Redis and redis-cli.
# Python packages go to target/clients-venv, npm packages to
# tests/clients/node/node_modules; both are reinstalled only when their lock
# files change.
#
# Prints one PASS/FAIL line per check, then `N passed, M failed`; exits
# non-zero if anything failed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

target_dir="${CARGO_TARGET_DIR:-$root/target}"
bin_dir="$target_dir/debug"
venv="$target_dir/clients-venv"
vendors_venv="$target_dir/clients-vendors-venv"
tiktoken_cache="$target_dir/clients-tiktoken"
redis_url="${EMBGATE__STORE__URL:-}"
run_id="$$-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
work="$(mktemp -d "${TMPDIR:-/tmp}/embgate-clients.XXXXXX")"

# tiktoken (pinned in requirements.txt) fetches cl100k_base from this URL and
# caches it under sha1(URL) in TIKTOKEN_CACHE_DIR; the tiktoken-rs crate ships
# the same file, so the cache is seeded from it and nothing is downloaded.
cl100k_url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
cl100k_sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

passed=0
failed=0
vendor_pid=""
gateway_pid=""
prefixes=()

export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
export no_proxy="$NO_PROXY"

summary() {
  echo "$passed passed, $failed failed"
}

# A setup step failed: count it, print the summary and stop.
die() {
  echo "FAIL setup: $*"
  failed=$((failed + 1))
  summary
  exit 1
}

stop() {
  local pid="$1"
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

delete_keys() {
  local prefix="$1"
  [ -n "$redis_url" ] || return 0
  redis-cli -u "$redis_url" --scan --pattern "$prefix:*" 2>/dev/null \
    | xargs -r -d '\n' -n 500 redis-cli -u "$redis_url" del >/dev/null 2>&1 || true
}

cleanup() {
  local status=$?
  stop "$gateway_pid"
  stop "$vendor_pid"
  for p in "${prefixes[@]}"; do delete_keys "$p"; done
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

http_ok() { # http_ok PORT PATH: true if GET answers 200
  (exec 3<>"/dev/tcp/127.0.0.1/$1" \
    && printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3 \
    && head -n 1 <&3 | grep -q ' 200 ') 2>/dev/null
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------- prerequisites

for tool in cargo python3 node npm; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
if [ -n "$redis_url" ]; then
  command -v redis-cli >/dev/null || die "redis-cli not found"
  [ "$(redis-cli -u "$redis_url" ping 2>/dev/null)" = "PONG" ] || die "no Redis answering at $redis_url"
fi

cargo build --quiet --bins -p embgate -p fake-vendor || die "cargo build failed"

# Python clients.
req_sum="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$req_sum" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv failed"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt" \
    || die "pip install -r tests/clients/requirements.txt failed"
  echo "$req_sum" >"$venv/.requirements.sha256"
fi

# The vendors' SDKs, in a venv of their own (their pins clash with the above).
vendors_sum="$(sha256sum "$here/requirements-vendors.txt" | cut -d' ' -f1)"
if [ ! -x "$vendors_venv/bin/python" ] || [ "$(cat "$vendors_venv/.requirements.sha256" 2>/dev/null)" != "$vendors_sum" ]; then
  rm -rf "$vendors_venv"
  python3 -m venv "$vendors_venv" || die "python3 -m venv failed"
  "$vendors_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements-vendors.txt" \
    || die "pip install -r tests/clients/requirements-vendors.txt failed"
  echo "$vendors_sum" >"$vendors_venv/.requirements.sha256"
fi

# Offline cl100k_base for Python tiktoken, from the tiktoken-rs crate source.
cl100k_cached="$tiktoken_cache/$(printf '%s' "$cl100k_url" | sha1sum | cut -d' ' -f1)"
if [ "$(sha256sum "$cl100k_cached" 2>/dev/null | cut -d' ' -f1)" != "$cl100k_sha256" ]; then
  crate_version="$(sed -n '/^name = "tiktoken-rs"$/{n;s/^version = "\(.*\)"$/\1/p;q}' Cargo.lock)"
  found=""
  for f in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tiktoken-rs-"${crate_version:-*}"/assets/cl100k_base.tiktoken \
    "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tiktoken-rs-*/assets/cl100k_base.tiktoken; do
    if [ -f "$f" ] && [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$cl100k_sha256" ]; then
      found="$f"
      break
    fi
  done
  [ -n "$found" ] || die "no cl100k_base.tiktoken with sha256 $cl100k_sha256 in the tiktoken-rs crate source"
  mkdir -p "$tiktoken_cache"
  cp "$found" "$cl100k_cached.tmp"
  mv "$cl100k_cached.tmp" "$cl100k_cached"
fi

# Node clients.
lock_sum="$(sha256sum "$here/node/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$here/node/node_modules/.embgate-lock.sha256" 2>/dev/null)" != "$lock_sum" ]; then
  (cd "$here/node" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
    || die "npm ci in tests/clients/node failed"
  echo "$lock_sum" >"$here/node/node_modules/.embgate-lock.sha256"
fi

# ---------------------------------------------------------------- servers

"$bin_dir/fake-vendor" --listen 127.0.0.1:0 >"$work/vendor.out" 2>"$work/vendor.err" &
vendor_pid=$!
vendor_url=""
for _ in $(seq 1 100); do
  vendor_url="$(sed -n 's/^listening on \(http:[^ ]*\)$/\1/p' "$work/vendor.out")"
  [ -n "$vendor_url" ] && break
  kill -0 "$vendor_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$vendor_url" ] || die "fake-vendor did not start: $(cat "$work/vendor.err")"

gateway_url=""
# The store timeouts are raised from their latency-oriented defaults so that
# a busy CI machine cannot turn a slow store read into a cache miss.
start_gateway() { # start_gateway NAME [VAR=VALUE...]: a gateway with a fresh store
  local name="$1" prefix="embgate-ci-clients-$run_id-$1" port
  shift
  local extra=("$@")
  prefixes+=("$prefix")
  for _attempt in 1 2 3; do
    port="$(free_port)"
    env "${extra[@]}" \
      EMBGATE__LISTEN="127.0.0.1:$port" \
      EMBGATE__UPSTREAM__BASE_URL="$vendor_url" \
      EMBGATE__STORE__URL="$redis_url" \
      EMBGATE__STORE__PATH="$work/store-$name/cache.redb" \
      EMBGATE__STORE__KEY_PREFIX="$prefix" \
      EMBGATE__STORE__TIMEOUT_MS="${EMBGATE__STORE__TIMEOUT_MS:-2000}" \
      EMBGATE__STORE__WRITE_TIMEOUT_MS="${EMBGATE__STORE__WRITE_TIMEOUT_MS:-5000}" \
      RUST_LOG="${RUST_LOG:-warn}" \
      "$bin_dir/embgate" serve >"$work/gateway-$name.log" 2>&1 &
    gateway_pid=$!
    for _ in $(seq 1 100); do
      if http_ok "$port" /healthz; then
        gateway_url="http://127.0.0.1:$port"
        return 0
      fi
      kill -0 "$gateway_pid" 2>/dev/null || break
      sleep 0.1
    done
    stop "$gateway_pid"
    gateway_pid=""
  done
  die "embgate serve did not answer /healthz: $(tail -n 20 "$work/gateway-$name.log")"
}

# run_clients NAME COMMAND...: runs one client script against its own gateway
# (configured with the VAR=VALUE words of `gateway_env`) and counts its
# PASS/FAIL lines.
gateway_env=()
run_clients() {
  local name="$1"
  shift
  start_gateway "$name" "${gateway_env[@]}"
  local status=0
  GATEWAY_URL="$gateway_url" VENDOR_URL="$vendor_url" \
    "$@" >"$work/$name.out" 2>"$work/$name.err" || status=$?
  cat "$work/$name.out"
  local p f
  p="$(grep -c '^PASS ' "$work/$name.out" || true)"
  f="$(grep -c '^FAIL ' "$work/$name.out" || true)"
  if [ "$status" -ne 0 ] && [ "$f" -eq 0 ]; then
    echo "FAIL $name: client script exited with status $status"
    f=1
  fi
  if [ "$f" -ne 0 ]; then
    echo "---- $name stderr (last 40 lines) ----" >&2
    tail -n 40 "$work/$name.err" >&2
    echo "---- gateway log (last 20 lines) ----" >&2
    tail -n 20 "$work/gateway-$name.log" >&2
  fi
  passed=$((passed + p))
  failed=$((failed + f))
  stop "$gateway_pid"
  gateway_pid=""
}

run_clients python env TIKTOKEN_CACHE_DIR="$tiktoken_cache" "$venv/bin/python" "$here/python_clients.py"
run_clients node node "$here/node/clients.mjs"

# The vendors' own APIs, each an upstream of its flavour on the fake.
vendor_host="${vendor_url%/v1}"
gateway_env=(
  EMBGATE__AUTH__MODE=open
  EMBGATE__UPSTREAM__API_KEY=sk-test
  EMBGATE__UPSTREAMS__COHERE__FLAVOUR=cohere
  EMBGATE__UPSTREAMS__COHERE__BASE_URL="$vendor_host"
  EMBGATE__UPSTREAMS__COHERE__MODELS="embed-*"
  EMBGATE__UPSTREAMS__COHERE__API_KEY=co-test
  EMBGATE__UPSTREAMS__VOYAGE__FLAVOUR=voyage
  EMBGATE__UPSTREAMS__VOYAGE__BASE_URL="$vendor_host/voyage/v1"
  EMBGATE__UPSTREAMS__VOYAGE__MODELS="voyage-*"
  EMBGATE__UPSTREAMS__VOYAGE__API_KEY=pa-test
  EMBGATE__UPSTREAMS__GEMINI__FLAVOUR=gemini
  EMBGATE__UPSTREAMS__GEMINI__BASE_URL="$vendor_host/v1beta"
  EMBGATE__UPSTREAMS__GEMINI__MODELS="gemini-*"
  EMBGATE__UPSTREAMS__GEMINI__API_KEY=g-test
  EMBGATE__UPSTREAMS__BEDROCK__FLAVOUR=bedrock
  EMBGATE__UPSTREAMS__BEDROCK__BASE_URL="$vendor_host"
  EMBGATE__UPSTREAMS__BEDROCK__MODELS="amazon.titan-embed-*,cohere.embed-*"
  AWS_ACCESS_KEY_ID=AKIDGATEWAY
  AWS_SECRET_ACCESS_KEY=gateway-secret
  AWS_REGION=us-east-1
)
run_clients vendors "$vendors_venv/bin/python" "$here/vendor_clients.py"
gateway_env=()

summary
[ "$failed" -eq 0 ]
