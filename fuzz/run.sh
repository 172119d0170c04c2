#!/usr/bin/env bash
# Fuzzes the request parser and the entry decoder for SECONDS each:
#
#   fuzz/run.sh [SECONDS]        (default 60)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). It passes the compiler
# flags of nightly Rust; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept
# them. What a run finds stays in fuzz/corpus/ (reused by the next run) and
# a crashing input in fuzz/artifacts/, both ignored by git.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
export RUSTC_BOOTSTRAP=1

for target in parse_request entry_decode; do
    corpus=("$PWD/corpus/$target")
    mkdir -p "${corpus[0]}"
    [ -d "seeds/$target" ] && corpus+=("$PWD/seeds/$target")
    options=(-max_total_time="$seconds")
    [ -f "$target.dict" ] && options+=(-dict="$PWD/$target.dict")
    cargo fuzz run "$target" "${corpus[@]}" -- "${options[@]}"
done
