#!/usr/bin/env bash
# Instructions the gateway executes per request, counted by callgrind: a
# figure that does not move with machine noise, for comparing two builds of
# the hot path (wall-clock figures come from bench/run.sh).
#
#   bench/instructions.sh [N] [base64|float] [L1 bytes]
#
# Runs target/release/embgate under valgrind twice, against the fake vendor
# and the Redis at 127.0.0.1:6379, sending the same 1-input all-hit request
# N and then 2N times over one keep-alive connection (after 50 untimed
# ones that store the entry). The difference between the two runs is the
# cost of N requests, with start-up and shut-down cancelled out. Prints
# instructions per request and the functions that take most of them.
# Defaults: N=2000, base64, L1 on at 128 MiB (0 sends every lookup to Redis).
# Needs valgrind (Debian package `valgrind`) and python3; takes about a minute.
# callgrind counts each byte a `rep movsb` copies as one instruction, so
# large memcpy calls weigh far more here than in time.
# Set EMBGATE_CALLGRIND_KEEP=DIR to keep both callgrind files there, for
# callgrind_annotate --tree=caller and the like.
set -euo pipefail

cd "$(dirname "$0")/.."
n="${1:-2000}"
format="${2:-base64}"
l1="${3:-134217728}"

command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install -y valgrind)" >&2; exit 1; }
cargo build --release -q -p embgate -p fake-vendor

work="$(mktemp -d "${TMPDIR:-/tmp}/embgate-instructions.XXXXXX")"
prefix="embgate-instructions-$$"
vendor_pid=""
cleanup() {
    [ -n "$vendor_pid" ] && kill "$vendor_pid" 2>/dev/null || true
    redis-cli --scan --pattern "$prefix:*" | xargs -r redis-cli del >/dev/null 2>&1 || true
    if [ -n "${EMBGATE_CALLGRIND_KEEP:-}" ]; then
        mkdir -p "$EMBGATE_CALLGRIND_KEEP"
        cp "$work"/callgrind.* "$EMBGATE_CALLGRIND_KEEP"/ 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

target/release/fake-vendor --listen 127.0.0.1:0 >"$work/vendor.log" 2>&1 &
vendor_pid=$!
for _ in $(seq 50); do
    vendor_url="$(grep -o 'http://[^ ]*' "$work/vendor.log" | head -1 || true)"
    [ -n "$vendor_url" ] && break
    sleep 0.1
done
[ -n "$vendor_url" ] || { echo "fake vendor did not start" >&2; exit 1; }

# One gateway run sending `$1` requests; under callgrind (leaving its file)
# unless `$2` is "native".
measure() {
    local requests="$1" out="$work/callgrind.$1" port
    local runner=(valgrind --tool=callgrind --callgrind-out-file="$out")
    [ "${2:-}" = native ] && runner=()
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    EMBGATE__LISTEN="127.0.0.1:$port" \
    EMBGATE__STORE__URL="${EMBGATE__STORE__URL:-redis://127.0.0.1:6379/0}" \
    EMBGATE__STORE__KEY_PREFIX="$prefix" \
    EMBGATE__UPSTREAM__BASE_URL="$vendor_url" \
    EMBGATE__UPSTREAM__API_KEY=sk-instructions \
    EMBGATE__AUTH__MODE=open \
    EMBGATE__L1__MAX_BYTES="$l1" \
        "${runner[@]}" target/release/embgate serve >"$work/gateway.$requests.log" 2>&1 &
    local gateway_pid=$!
    python3 - "$port" "$requests" "$format" <<'PY'
import http.client, json, sys, time
port, n, fmt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for _ in range(600):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", "/healthz"); c.getresponse().read(); break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("gateway did not start")
body = json.dumps({"model": "text-embedding-3-small", "encoding_format": fmt,
                   "input": "the quick brown fox jumps over the lazy dog"})
def post():
    c.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json",
                                               "Authorization": "Bearer sk-instructions"})
    r = c.getresponse(); r.read()
    if r.status != 200:
        sys.exit(f"HTTP {r.status}")
    return r.getheader("x-embgate-cache")
for _ in range(50):
    post()
hits = sum(post() == "hit" for _ in range(n))
if hits != n:
    sys.exit(f"only {hits} of {n} requests were hits")
PY
    kill -INT "$gateway_pid"
    wait "$gateway_pid" || true
}
# The first request pays the vendor and loads the tokeniser: done once,
# outside the measured runs, so both find the entry stored.
measure 1 native
measure "$n"
measure "$((2 * n))"

python3 - "$work/callgrind.$n" "$work/callgrind.$((2 * n))" "$n" "$format" "$l1" <<'PY'
import re, subprocess, sys
def load(path):
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no",
                          "--threshold=100", path], capture_output=True, text=True).stdout
    total, by_fn = 0, {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*)$", line)
        if not m:
            continue
        count, name = int(m.group(1).replace(",", "")), m.group(2)
        if "PROGRAM TOTALS" in name:
            total = count
            continue
        name = re.sub(r" \[.*\]$", "", name).replace("???:", "")
        by_fn[name] = by_fn.get(name, 0) + count
    return total, by_fn
(t1, f1), (t2, f2) = load(sys.argv[1]), load(sys.argv[2])
n, fmt, l1 = int(sys.argv[3]), sys.argv[4], sys.argv[5]
print(f"1-input all-hit {fmt}, L1 {'off' if l1 == '0' else l1 + ' bytes'}: "
      f"{(t2 - t1) / n:,.0f} instructions per request")
top = sorted(((f2.get(k, 0) - f1.get(k, 0)) / n, k) for k in set(f1) | set(f2))[::-1]
for per, name in top[:25]:
    print(f"{per:9,.0f}  {name[:140]}")
PY
