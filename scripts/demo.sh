#!/usr/bin/env bash
# make demo: the product on this machine, for real. Two tiny models served by real vLLM (CPU
# build) in containers run by the fleet, the gateway in front, OpenAI calls to both, a
# switch with a budget that fits only one model at a time, and the fleet's status.
#
# Run by `make demo` after the prerequisites (Docker engine, images, vLLM CPU image, tiny
# models). Leaves the gateway and the models running; `make demo-down` stops everything.
#
# Environment: DEMO_REGISTRY (models.cpu.toml), DEMO_PORT (gateway port, 8000).
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

REG="${DEMO_REGISTRY:-models.cpu.toml}"
PORT="${DEMO_PORT:-8000}"
PY="${PY:-$REPO_ROOT/.venv/bin/python}"
STATE="$REPO_ROOT/.cache/demo"
GATEWAY="http://127.0.0.1:$PORT"
mkdir -p "$STATE"
T_START="$(_now)"
fleet() { "$PY" -m fleet --registry "$REG" "$@"; }

step_begin "registry check ($REG)"
fleet check || die "the registry does not fit this host (see above)"
step_done

step_begin "fleet up: tiny-a and tiny-b in real vLLM containers (about a minute the first time)"
fleet up || die "the models did not come up; see \`fleet --registry $REG logs MODEL\`"
step_done

step_begin "gateway on $GATEWAY"
if [[ -f "$STATE/gateway.pid" ]] && kill -0 "$(cat "$STATE/gateway.pid")" 2>/dev/null \
        && curl -fsS "$GATEWAY/health" >/dev/null 2>&1; then
    step_cached "already running, pid $(cat "$STATE/gateway.pid")"
else
    nohup "$PY" -m gateway --registry "$REG" --port "$PORT" >"$STATE/gateway.log" 2>&1 &
    echo $! >"$STATE/gateway.pid"
    for _ in $(seq 100); do
        curl -fsS "$GATEWAY/health" >/dev/null 2>&1 && break
        kill -0 "$(cat "$STATE/gateway.pid")" 2>/dev/null \
            || die "the gateway exited: $(tail -5 "$STATE/gateway.log")"
        sleep 0.1
    done
    curl -fsS "$GATEWAY/health" >/dev/null || die "the gateway did not answer on $GATEWAY"
    step_done "pid $(cat "$STATE/gateway.pid"), log $STATE/gateway.log"
fi

step_begin "OpenAI calls through the gateway"
"$PY" scripts/demo_client.py "$GATEWAY" || die "a call through the gateway failed"
step_done

step_begin "fleet switch with a budget of one core: tiny-a only, then tiny-b only"
# --host-cpus 1 overrides the registry's host inventory: the two models (one core each)
# cannot be awake together, so each switch evicts the other (sleep or stop) first.
fleet --host-cpus 1 switch tiny-a || die "switch to tiny-a failed"
fleet --host-cpus 1 switch tiny-b || die "switch to tiny-b failed"
step_done

step_begin "on-demand activation: a request for the evicted tiny-a"
t0="$(_now)"
"$PY" - "$GATEWAY" <<'PYEOF'
import sys, openai
c = openai.OpenAI(base_url=f"{sys.argv[1]}/v1", api_key="unused", timeout=600)
r = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "Hi"}],
                              max_tokens=5)
print(f"  tiny-a answered {r.choices[0].message.content!r} after the gateway woke it")
PYEOF
step_done

step_begin "one-core budget through the gateway: a client per model at once"
# A second gateway on port PORT+1 whose registry keeps one core for models: tiny-a and tiny-b
# cannot be awake together, so its scheduler makes them take turns (the holder drains after
# its quantum, the other is brought up). tiny-a holds the core first; each answer is printed
# with how long it waited.
ONE="$STATE/models.one-core.toml"
awk -v dir="$(cd "$(dirname "$REG")" && pwd)" '
    /^\[/ { section = $1 }
    section == "[host]" && /^cpus *=/ { print "cpus = 1"; next }
    /^models_dir *= *"[^\/]/ { sub(/"(\.\/)?/, "\"" dir "/") }
    { print }' "$REG" >"$ONE"
# Make the one-core world real first: the activation above woke tiny-a beside tiny-b (two
# cores); tiny-b goes to sleep so that tiny-a alone holds the core.
fleet --host-cpus 1 sleep tiny-b || die "putting tiny-b to sleep failed"
fleet --host-cpus 1 switch tiny-a || die "switch to tiny-a failed"
PORT1=$((PORT + 1))
GATEWAY_SCHEDULER=fair nohup "$PY" -m gateway --registry "$ONE" --port "$PORT1" \
    >"$STATE/gateway-one-core.log" 2>&1 &
echo $! >"$STATE/gateway-one-core.pid"
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$PORT1/health" >/dev/null 2>&1 && break
    sleep 0.1
done
rc=0
"$PY" scripts/demo_timeshare.py "http://127.0.0.1:$PORT1" tiny-a tiny-b --seconds 15 || rc=$?
kill "$(cat "$STATE/gateway-one-core.pid")" 2>/dev/null || true
rm -f "$STATE/gateway-one-core.pid"
[[ $rc == 0 ]] || die "a request through the one-core gateway was not answered; see $STATE/gateway-one-core.log"
step_done

step_begin "fleet up: back to the registry's placement (both models, one core each)"
# The one-core switch pinned tiny-b to core 0; under the registry's two cores it belongs on
# core 1, so `fleet up` recreates it there (status would show it as drifted until then).
fleet up || die "the models did not come back up; see \`fleet --registry $REG logs MODEL\`"
step_done

step_begin "fleet status"
fleet status
step_done

say ""
say "The demo took $(_elapsed "$T_START"). The gateway is still running on $GATEWAY:"
cat >&2 <<EOF2

  curl $GATEWAY/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}'

  python3 -c 'from openai import OpenAI
  c = OpenAI(base_url="$GATEWAY/v1", api_key="unused")
  print(c.chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "Hi"}]).choices[0].message.content)'

  .venv/bin/fleet --registry $REG status        # what runs
  make demo-down                                # stop the gateway and the models
EOF2
say ""
say "Dashboard (live models, queues, switches; served to this machine only; actions need the"
say "gateway started with GATEWAY_ADMIN_KEY set):"
say "  $GATEWAY/ui/"
