# Shared by the scripts: install what a fresh machine lacks, pick the build directory.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# One target directory outside the clone when we may use one, so CI and fresh clones reuse
# the (15–30 minute) RocksDB build; ./target otherwise.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  cache=/var/cache/convoy-target
  if mkdir -p "$cache" 2>/dev/null && [ -w "$cache" ]; then
    export CARGO_TARGET_DIR="$cache"
  else
    export CARGO_TARGET_DIR="$ROOT/target"
  fi
fi
BIN="$CARGO_TARGET_DIR/release/convoy"
# Test-only builds (planted bugs) go here, never over $BIN.
PLANTED_TARGET_DIR="${CONVOY_PLANTED_TARGET_DIR:-${CARGO_TARGET_DIR%-target}-planted}"
[ "$PLANTED_TARGET_DIR" = "$CARGO_TARGET_DIR" ] && PLANTED_TARGET_DIR="$CARGO_TARGET_DIR-planted"
export PLANTED_TARGET_DIR

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; return 1; fi
}

# System packages the build needs: bindgen needs libclang, RocksDB a C++ compiler.
ensure_system_packages() {
  local missing=()
  for p in libclang-dev clang g++ make pkg-config "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing system packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ! command -v cargo >/dev/null; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
  fi
  command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; return 1; }
}

# Cargo names a workspace crate's artifacts by its path relative to the workspace, and judges
# them fresh when no source file is newer than the last build. In a target directory shared by
# two clones, a clone whose files are older than the other clone's last build would find the
# other clone's crates "fresh" and run that code. So a target directory records which clone
# built in it last; a build from another clone first touches its own files, which makes cargo
# rebuild this clone's crates (not the dependencies, not RocksDB).
# Usage: claim_target_dir DIR.
claim_target_dir() {
  local dir=$1 stamp="$1/.convoy-source" last
  mkdir -p "$dir"
  last=$(cat "$stamp" 2>/dev/null || true)
  [ "$last" = "$ROOT" ] && return 0
  log "$dir was last built from ${last:-a clone it did not record}: rebuilding this clone's crates there"
  find "$ROOT" \( -path "$ROOT/.git" -o -path "$ROOT/target" -o -path "$ROOT/target-planted" -o -path "$ROOT/data" \) \
    -prune -o -type f -print0 | xargs -0 touch -c
  echo "$ROOT" >"$stamp"
}

# One release build serves the binary and the tests (RocksDB compiles once).
build_release() {
  log "building convoy (release; the first build compiles RocksDB and takes a while)"
  claim_target_dir "$CARGO_TARGET_DIR"
  (cd "$ROOT" && cargo build --release --bins)
  # Keep the README's paths valid whichever target directory was used.
  if [ "$CARGO_TARGET_DIR" != "$ROOT/target" ]; then
    mkdir -p "$ROOT/target/release"
    ln -sf "$BIN" "$ROOT/target/release/convoy"
  fi
}

# Runs cargo for a planted-bug build (test-only, `--features planted-bugs`) in
# $PLANTED_TARGET_DIR, never over $BIN. It links the RocksDB library the real build compiled,
# so RocksDB is not compiled twice.
planted_cargo() {
  local rocks=""
  claim_target_dir "$PLANTED_TARGET_DIR"
  for d in "$CARGO_TARGET_DIR"/release/build/librocksdb-sys-*/out; do
    [ -f "$d/librocksdb.a" ] && rocks="$d"
  done
  if [ -n "$rocks" ]; then
    CARGO_TARGET_DIR="$PLANTED_TARGET_DIR" ROCKSDB_LIB_DIR="$rocks" ROCKSDB_STATIC=1 cargo "$@"
  else
    CARGO_TARGET_DIR="$PLANTED_TARGET_DIR" cargo "$@"
  fi
}
