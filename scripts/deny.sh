#!/usr/bin/env bash
# Ferry's dependency policy (deny.toml): licenses, duplicate versions,
# sources, and security advisories when the advisory database can be
# fetched. Installs cargo-deny (pinned) into ~/.cargo/bin if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.20.2
if ! cargo deny --version 2>/dev/null | grep -q " $version"; then
  echo "==> installing cargo-deny $version (cargo install --locked)"
  cargo install --locked --quiet cargo-deny --version "$version"
fi

echo "==> cargo deny check licenses bans sources"
cargo deny --color never check licenses bans sources

# The advisory database is a git repository on GitHub; machines without
# a route there skip the check and say so.
if timeout 20 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
  echo "==> cargo deny check advisories"
  cargo deny --color never check advisories
else
  echo "==> cargo deny check advisories: SKIPPED (github.com/rustsec/advisory-db is not reachable from here)"
fi
