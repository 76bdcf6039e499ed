#!/usr/bin/env bash
# Prepare a fresh Debian machine for building and testing assure-vmm: host packages, the
# Rust toolchain check, KVM access, and guest binaries fetched from Debian's archive.
# Idempotent: re-running it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS="$PWD/target/deps"
say() { printf '[setup] %s\n' "$*"; }

need_pkgs=()
command -v gcc >/dev/null || need_pkgs+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need_pkgs+=(libc6-dev)
command -v strip >/dev/null || need_pkgs+=(binutils)
command -v curl >/dev/null || need_pkgs+=(curl)
command -v python3 >/dev/null || need_pkgs+=(python3)
command -v dpkg-deb >/dev/null || need_pkgs+=(dpkg)
# The real clients of the Debian servers (tests/servers.rs, bench/servers).
command -v wrk >/dev/null || need_pkgs+=(wrk)
{ command -v redis-cli && command -v redis-benchmark; } >/dev/null || need_pkgs+=(redis-tools)
{ command -v memcslap && command -v memccp && command -v memccat; } >/dev/null || need_pkgs+=(libmemcached-tools)
{ command -v mosquitto_pub && command -v mosquitto_sub; } >/dev/null || need_pkgs+=(mosquitto-clients)
# Debian's debugger, driven against the gdb stub (tests/gdb.rs).
command -v gdb >/dev/null || need_pkgs+=(gdb)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  say "installing ${need_pkgs[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }

if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  echo "setup: /dev/kvm is missing or not accessible to $(id -un); assure-vmm needs KVM" >&2
  exit 1
fi

# Guest binaries from Debian, unpacked without installing them on the host.
fetch_deb() { # package, marker file inside the unpacked tree
  local pkg=$1 marker=$2 dir="$DEPS/$1"
  if [ -e "$dir/$marker" ]; then return 0; fi
  say "fetching Debian package $pkg"
  mkdir -p "$DEPS/debs" "$dir"
  if ! (cd "$DEPS/debs" && apt-get download -q "$pkg" >/dev/null 2>&1); then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    (cd "$DEPS/debs" && apt-get download -q "$pkg") || { echo "setup: cannot download Debian package $pkg" >&2; exit 1; }
  fi
  dpkg-deb -x "$(ls -t "$DEPS"/debs/"${pkg}"_*.deb | head -n1)" "$dir"
  [ -e "$dir/$marker" ] || { echo "setup: $pkg does not contain $marker" >&2; exit 1; }
}
fetch_deb busybox-static bin/busybox

say "building"
cargo build --workspace --quiet

# Server images from Debian packages (docs/images.md): up-to-date images are not rebuilt.
say "building images"
target/debug/assure-vmm image build bugsrv lighttpd nginx-light redis memcached mosquitto 2>&1 \
  | sed 's/^/[setup] /'
say "ready"
