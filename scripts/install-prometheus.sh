#!/usr/bin/env bash
# Makes a real Prometheus server available for the metrics tests (idempotent).
#
# Debian's `prometheus` package is the server; it comes through apt like any other
# package. Nothing is started here: the tests run their own instance on loopback with
# a generated config. Prints the binary's path on stdout.
set -euo pipefail

find_prometheus() {
    command -v prometheus 2>/dev/null || { [[ -x /usr/bin/prometheus ]] && echo /usr/bin/prometheus; }
}

if binary="$(find_prometheus)"; then
    echo "$binary"
    exit 0
fi

command -v apt-get >/dev/null || { echo "install-prometheus: no prometheus on PATH and no apt-get to install Debian's package" >&2; exit 1; }
SUDO=""
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || { echo "install-prometheus: apt-get needs root (or sudo); install the 'prometheus' package by hand" >&2; exit 1; }
    SUDO="sudo"
fi

echo "install-prometheus: installing Debian's prometheus package" >&2
export DEBIAN_FRONTEND=noninteractive
# A fresh machine has no package lists yet; update only then, or when the install fails on stale ones.
if ! $SUDO apt-get install -y -q --no-install-recommends prometheus >&2; then
    $SUDO apt-get update -q >&2
    $SUDO apt-get install -y -q --no-install-recommends prometheus >&2
fi
binary="$(find_prometheus)" || { echo "install-prometheus: the package installed no prometheus binary" >&2; exit 1; }
"$binary" --version >&2
echo "$binary"
