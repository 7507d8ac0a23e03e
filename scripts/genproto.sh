#!/usr/bin/env bash
# Generates the Python gRPC code for proto/ebpflb/v1 into OUT/v1 (the package
# ebpflb.api.v1). The one way to make it: `make proto`. Never edit the output.
# tests/unit/test_proto_generated.py runs this into a temporary folder and fails
# when the committed files differ.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: genproto.sh OUT_DIR}   # the folder that holds v1/, e.g. ebpflb/api
venv=${VENV:-$top/.venv}
mkdir -p "$out/v1"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# -Iebpflb/api=proto/ebpflb names the file ebpflb/api/v1/registry.proto, so the
# generated modules import each other as ebpflb.api.v1.
( cd "$top" && PATH="$venv/bin:$PATH" "$venv/bin/python" -m grpc_tools.protoc \
    -Iebpflb/api=proto/ebpflb \
    --python_out="$tmp" --grpc_python_out="$tmp" \
    --mypy_out="$tmp" --mypy_grpc_out="$tmp" \
    proto/ebpflb/v1/registry.proto )
cp "$tmp"/ebpflb/api/v1/* "$out/v1/"
[ -f "$out/__init__.py" ] || : > "$out/__init__.py"
[ -f "$out/v1/__init__.py" ] || : > "$out/v1/__init__.py"
