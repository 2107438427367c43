#!/usr/bin/env bash
# make demo-down: stop the demo's gateway and remove the demo's model containers.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
STATE="$REPO_ROOT/.cache/demo"
if [[ -f "$STATE/gateway.pid" ]]; then
    kill "$(cat "$STATE/gateway.pid")" 2>/dev/null || true
    rm -f "$STATE/gateway.pid"
    say "gateway stopped"
fi
if [[ -f "$STATE/gateway-one-core.pid" ]]; then  # left by an interrupted demo
    kill "$(cat "$STATE/gateway-one-core.pid")" 2>/dev/null || true
    rm -f "$STATE/gateway-one-core.pid"
fi
"${PY:-$REPO_ROOT/.venv/bin/python}" -m fleet --registry "${DEMO_REGISTRY:-models.cpu.toml}" down
