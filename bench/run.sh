#!/usr/bin/env bash
# Benchmarks the gateway and writes BENCHMARKS.md at the repository root.
#
#   bench/run.sh [--no-criterion] [loadgen options]
#
# Builds the release binaries, runs the criterion hot-path micro-benchmarks
# (benches/hot_path.rs, a few seconds each), `engines` (redb, which the
# embedded store ships, next to fjall on the same workload), then `loadgen`,
# which starts the
# fake vendor and `target/release/embgate serve` against the Redis at
# 127.0.0.1:6379 (override with --redis-url), measures, deletes its keys and
# writes the report. After the other scenarios it stops that gateway and
# repeats the Zipf and 1-input base64 runs (one request per connection, and
# pipelined) on a second one with the in-process L1 cache on, as shipped
# (EMBGATE__L1__MAX_BYTES=--l1-bytes, default 128 MiB), for the report's
# targets and "In-process L1 cache" section; --no-l1 skips that. Then it
# starts a local Redis Cluster of three masters (redis-server and redis-cli
# on free loopback ports) and a gateway on it, and repeats the 64- and
# 2048-input all-hit base64 runs with the store round trips per request,
# for the report's "Redis Cluster" rows; --no-cluster skips that. Then the
# "Stores and limits" rows: gateways on the embedded store, on Redis with
# the shipped limits and with them relaxed, in rounds; --no-stores skips
# that. Each target
# is judged on the median of --rounds (default 3) back-to-back rounds of its
# runs and the ceiling. Needs a running Redis; takes about 10 minutes once
# built. For instruction counts per request (no machine noise), see
# bench/instructions.sh.
#
# loadgen options (target/release/loadgen --help) pass through, e.g.
#   bench/run.sh --only zipf,hit1 --l1-bytes 67108864 --out /tmp/l1.md
set -euo pipefail

cd "$(dirname "$0")/.."

criterion=1
args=()
for a in "$@"; do
    case "$a" in
        --no-criterion) criterion=0 ;;
        *) args+=("$a") ;;
    esac
done

cargo build --release -p embgate -p embgate-bench

criterion_out=""
if [ "$criterion" = 1 ]; then
    criterion_out="$(mktemp "${TMPDIR:-/tmp}/embgate-criterion.XXXXXX")"
    trap 'rm -f "$criterion_out"' EXIT
    cargo bench -p embgate --bench hot_path -- --output-format bencher | tee "$criterion_out"
fi

# redb (shipped) next to fjall on the embedded store's workload.
engines_out="$(mktemp "${TMPDIR:-/tmp}/embgate-engines.XXXXXX")"
trap 'rm -f "$engines_out" ${criterion_out:+"$criterion_out"}' EXIT
target/release/engines --out "$engines_out"

command="bench/run.sh${*:+ $*}"
exec_args=(--command "$command" --engines "$engines_out")
if [ -n "$criterion_out" ]; then
    exec_args+=(--criterion "$criterion_out")
fi
target/release/loadgen "${exec_args[@]}" ${args[@]+"${args[@]}"}
