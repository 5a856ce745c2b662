#!/usr/bin/env bash
# test-aarch64.sh - cross-build dmattn for aarch64 and run its test suites under qemu-user.
#
#   scripts/test-aarch64.sh [extra meson test arguments, e.g. --suite forward -v]
#
# Idempotent, works from a clean clone on Debian/Ubuntu (amd64 build machine):
#   1. installs what is missing (needs root or sudo): the aarch64 cross gcc, qemu-user, meson,
#      ninja, pkg-config, and the arm64 multiarch runtime and libraries the build links
#      (libc6, libgomp1, check, libsubunit-dev, libopenblas-dev);
#   2. configures build-aarch64/ with tools/cross/aarch64-linux-gnu.ini (reconfigures an existing
#      one, wipes it if that fails);
#   3. builds, then runs `meson test` (the test binaries run under qemu-aarch64; there
#      dma_isa_supported(DMA_ISA_NEON) is 1 and the suites check the scalar and NEON paths).
# Exits non-zero on any failure.
#
# Environment:
#   BUILD_DIR             build directory (default: build-aarch64 in the repository root)
#   QEMU_TIMEOUT_MULT     meson test --timeout-multiplier (default: 10; qemu is ~10-50x slower)
#   MESON_SETUP_ARGS      extra arguments for meson setup (e.g. -Dbuildtype=debug)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"

build_dir=${BUILD_DIR:-build-aarch64}
cross_file=tools/cross/aarch64-linux-gnu.ini
timeout_mult=${QEMU_TIMEOUT_MULT:-10}

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'test-aarch64.sh: %s\n' "$*" >&2; exit 1; }

[ -f "$cross_file" ] || die "missing $cross_file (run from a dmattn checkout)"

# --- 1. toolchain, emulator, arm64 libraries ----------------------------------------------------

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

installed() { # package[:arch] -> 0 if installed
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

command -v dpkg-query >/dev/null 2>&1 || die "this script installs with apt/dpkg (Debian or Ubuntu)"

missing=()
# Build machine tools. qemu-user provides qemu-aarch64 (qemu-user-static only *-static names on
# Debian 12), which the cross file's exe_wrapper runs.
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
installed libc6-dev-arm64-cross || missing+=(libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
command -v meson >/dev/null 2>&1 || missing+=(meson)
command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
# arm64 multiarch: the runtime qemu loads (see the cross file) and the libraries the build links.
arm64_pkgs=(libc6:arm64 libgomp1:arm64 check:arm64 libsubunit-dev:arm64 libopenblas-dev:arm64)
need_arch=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    need_arch=1
    missing+=("${arm64_pkgs[@]}")
else
    for p in "${arm64_pkgs[@]}"; do
        installed "$p" || missing+=("$p")
    done
fi

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    if [ "$need_arch" -eq 1 ]; then
        as_root dpkg --add-architecture arm64
    fi
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -q || die "apt-get update failed (on Ubuntu, arm64 packages come from \
ports.ubuntu.com: add an [arch=arm64] source for it)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}"
fi

command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || die "aarch64-linux-gnu-gcc not found"
command -v qemu-aarch64 >/dev/null 2>&1 || die "qemu-aarch64 not found"
[ -e /lib/ld-linux-aarch64.so.1 ] || die "/lib/ld-linux-aarch64.so.1 missing (libc6:arm64)"

# --- 2. configure --------------------------------------------------------------------------------

# Tests enabled (a missing `check` is an error here, not a silent skip); no CUDA when cross-building.
# shellcheck disable=SC2206
setup_args=(--cross-file "$cross_file" -Dtests=enabled -Dcuda=disabled ${MESON_SETUP_ARGS:-})

if [ -f "$build_dir/meson-private/coredata.dat" ]; then
    log "reconfiguring $build_dir"
    if ! meson setup --reconfigure "$build_dir" "${setup_args[@]}"; then
        log "reconfigure failed; wiping $build_dir"
        meson setup --wipe "$build_dir" "${setup_args[@]}"
    fi
else
    rm -rf "$build_dir"
    log "configuring $build_dir"
    meson setup "$build_dir" "${setup_args[@]}"
fi

# --- 3. build and test ---------------------------------------------------------------------------

log "building"
meson compile -C "$build_dir"

log "testing under qemu-aarch64 (timeout multiplier $timeout_mult)"
start=$(date +%s)
status=0
meson test -C "$build_dir" --print-errorlogs --timeout-multiplier "$timeout_mult" "$@" || status=$?
log "meson test: exit $status after $(( $(date +%s) - start )) s"
exit "$status"
