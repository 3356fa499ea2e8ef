#!/usr/bin/env bash
# Regenerate qwenvl_pd/protos/*_pb2*.py{,i} from qwenvl_pd.proto (or into OUT_DIR, for the CI check).
# Usage: scripts/gen_protos.sh [OUT_DIR]   PYTHON=... picks the interpreter (default: .venv, python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/qwenvl_pd/protos"
out="${1:-$src}"
py="${PYTHON:-}"
[ -n "$py" ] || { [ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python" || py=python3; }
mkdir -p "$out"
# -I is the proto's own folder, so the file is registered as "qwenvl_pd.proto" whatever the checkout path
"$py" -m grpc_tools.protoc -I "$src" --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$src/qwenvl_pd.proto"
# protoc writes a top-level import; make it package-relative
sed -i.bak 's/^import qwenvl_pd_pb2 as /from . import qwenvl_pd_pb2 as /' "$out/qwenvl_pd_pb2_grpc.py"
rm "$out/qwenvl_pd_pb2_grpc.py.bak"
