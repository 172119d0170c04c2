#!/usr/bin/env python3
"""Checks that .env.example and docker-compose.yml follow src/config.rs:
every key of `DEFAULTS` appears in .env.example as EMBGATE__SECTION__KEY with
its default value and a comment line above it, no EMBGATE__ variable there is
unknown, and docker-compose.yml passes every one to the gateway.
Standard library only (Python 3.11+ for tomllib)."""

import re
import sys
import tomllib

CONFIG = "src/config.rs"
ENV_EXAMPLE = ".env.example"
COMPOSE = "docker-compose.yml"
# Settings the compose file fixes for its own network instead of passing on.
COMPOSE_FIXED = {"EMBGATE__LISTEN", "EMBGATE__STORE__URL"}


def defaults():
    with open(CONFIG, encoding="utf-8") as f:
        source = f.read()
    m = re.search(r'DEFAULTS: &str = r#"(.*?)"#;', source, re.S)
    if not m:
        sys.exit(f"FAIL  {CONFIG}: no DEFAULTS string found")
    flat = {}

    def walk(prefix, table):
        for key, value in table.items():
            name = f"{prefix}__{key.upper()}"
            if isinstance(value, dict):
                walk(name, value)
            else:
                flat[name] = value

    walk("EMBGATE", tomllib.loads(m.group(1)))
    return flat


def env_example():
    entries, comment_before = {}, set()
    previous_comment = False
    with open(ENV_EXAMPLE, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("#"):
                previous_comment = True
                continue
            if "=" in line:
                name, value = line.split("=", 1)
                entries[name.strip()] = value.strip()
                if previous_comment:
                    comment_before.add(name.strip())
            previous_comment = False
    return entries, comment_before


def same(default, text):
    if isinstance(default, bool):
        return text.lower() == str(default).lower()
    if isinstance(default, (int, float)):
        try:
            return float(text) == float(default)
        except ValueError:
            return False
    return text == str(default)


def main():
    want = defaults()
    have, commented = env_example()
    with open(COMPOSE, encoding="utf-8") as f:
        compose = f.read()
    failed = passed = 0
    for name, default in want.items():
        problems = []
        if name not in have:
            problems.append(f"missing from {ENV_EXAMPLE}")
        else:
            if not same(default, have[name]):
                problems.append(f"{ENV_EXAMPLE} has {have[name]!r}, default is {default!r}")
            if name not in commented:
                problems.append(f"no comment line above it in {ENV_EXAMPLE}")
        if name not in COMPOSE_FIXED and not re.search(rf"^\s*{re.escape(name)}:", compose, re.M):
            problems.append(f"not passed to the gateway in {COMPOSE}")
        if problems:
            failed += 1
            print(f"FAIL  {name}  ({'; '.join(problems)})")
        else:
            passed += 1
            print(f"OK    {name}")
    for name in sorted(have):
        if name.startswith("EMBGATE__") and name not in want:
            failed += 1
            print(f"FAIL  {name}  (in {ENV_EXAMPLE}, but not a key of DEFAULTS in {CONFIG})")
    if "RUST_LOG" not in have:
        failed += 1
        print(f"FAIL  RUST_LOG  (missing from {ENV_EXAMPLE})")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
