#!/usr/bin/env bash
# Makes Azurite, Microsoft's Azure Storage emulator, available for the storage tests
# (idempotent). It comes from the npm registry like any other package and runs on the
# machine's Node.js. Prints the path of its Blob service command on stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${AZURITE_PREFIX:-$ROOT/.tools/azurite}"
# Pinned: the last release that runs on Node.js 20 (3.36 asks for 21 or newer).
PACKAGE="${AZURITE_PACKAGE:-azurite@3.35.0}"
BINARY="$PREFIX/node_modules/.bin/azurite-blob"

if [[ -x "$BINARY" ]]; then
    echo "$BINARY"
    exit 0
fi

command -v npm >/dev/null || { echo "install-azurite: npm is needed to fetch $PACKAGE" >&2; exit 1; }
echo "install-azurite: installing $PACKAGE from the npm registry" >&2
mkdir -p "$PREFIX"
npm install --prefix "$PREFIX" --no-audit --no-fund --omit=dev --silent "$PACKAGE" >&2
"$BINARY" --version >&2
echo "$BINARY"
