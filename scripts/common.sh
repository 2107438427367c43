# shellcheck shell=bash
# Shared helpers for scripts/install-docker.sh and scripts/build-images.sh (sourced, not run).
#
# Progress and diagnostics go to stderr, one line per event, so a person (or a CI log) can
# follow what runs, what is cached and how long each step took:
#   ==> compose-plugin: start
#   ==> compose-plugin: cached (docker compose 2.40.3 answers for /usr/bin/docker)  [0.2 s]
# The output of long sub-commands goes to a log file under .cache/logs/; on failure its last
# lines are printed and the script exits non-zero with a message that names the step.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_DIR="${VLLM_FLEET_LOG_DIR:-$REPO_ROOT/.cache/logs}"
SCRIPT_NAME="$(basename "$0" .sh)"

# The Docker client every script uses. Debian's engine ships its 20.10 client (with BuildKit)
# at /usr/bin/docker; a newer standalone client without buildx may come first on PATH, and
# it cannot run `RUN --mount` builds. Override with DOCKER=/path/to/docker.
DOCKER="${DOCKER:-/usr/bin/docker}"
PYTHON="${PYTHON:-python3}"

_now() { echo "${EPOCHREALTIME:-$(date +%s)}"; }
_elapsed() { awk -v a="$1" -v b="$(_now)" 'BEGIN { printf "%.1f s", b - a }'; }

say() { printf '%s\n' "$*" >&2; }

# step_begin NAME: start timing a step.
step_begin() {
    STEP="$1"
    STEP_T0="$(_now)"
    say "==> $STEP: start"
}

# step_cached WHY: the step had nothing to do.
step_cached() { say "==> $STEP: cached ($*)  [$(_elapsed "$STEP_T0")]"; }

# step_done [WHAT]: the step did its work.
step_done() { say "==> $STEP: done${1:+ ($*)}  [$(_elapsed "$STEP_T0")]"; }

# die MESSAGE: fail the current step with a clear message.
die() {
    say "ERROR [${STEP:-$SCRIPT_NAME}]: $*"
    exit 1
}

# run_logged LOGNAME CMD...: run CMD with its output in $LOG_DIR/LOGNAME.log (streamed to
# stderr as well when VERBOSE=1). On failure print the log's tail and return the exit code.
run_logged() {
    local name="$1"
    shift
    mkdir -p "$LOG_DIR"
    local log="$LOG_DIR/$name.log"
    local rc=0
    say "    \$ $*"
    say "    (output in $log)"
    if [[ "${VERBOSE:-0}" == 1 ]]; then
        "$@" 2>&1 | tee "$log" >&2 || rc=${PIPESTATUS[0]}
    else
        "$@" >"$log" 2>&1 || rc=$?
    fi
    if [[ $rc -ne 0 ]]; then
        say "---- last 60 lines of $log ----"
        tail -n 60 "$log" >&2 || true
        say "---- end of $log ----"
    fi
    return "$rc"
}

# docker_answers: true when the daemon answers through $DOCKER within 10 s.
docker_answers() {
    timeout 10 "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1
}

require_docker_client() {
    [[ -x "$DOCKER" ]] || die "no Docker client at $DOCKER; run: bash scripts/install-docker.sh"
}

require_daemon() {
    require_docker_client
    docker_answers || die "the Docker daemon does not answer ($DOCKER version failed); run: bash scripts/install-docker.sh"
}
