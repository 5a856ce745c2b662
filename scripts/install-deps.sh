#!/usr/bin/env bash
# Install the packages dmattn builds and tests with, when any is missing (Debian; root or sudo).
set -euo pipefail
pkgs=(build-essential meson ninja-build pkg-config libopenblas-dev check libsubunit-dev python3
      clang libomp-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
