#!/usr/bin/env bash
# Prints the absolute directory cargo builds into for this workspace: CARGO_TARGET_DIR,
# build.target-dir of a .cargo/config, or target/ — as cargo itself resolves it, so that scripts
# load the library and executables cargo just built, never a stale copy under ./target.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
