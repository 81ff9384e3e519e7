#!/usr/bin/env bash
# Regenerates the Python stubs of protos/ into cl_service/v1/ (never edit those by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export PATH="$(dirname "$PY"):$PATH"
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  protos/cl_service/v1/*.proto
