#!/usr/bin/env bash
# Build the project's local images (no registry is reachable: everything is built here).
#
#   bash scripts/build-images.sh [base|wheels|sim|gateway|all]...     (default: all)
#
#   base     vllm-fleet/base:bookworm  debootstrap'd Debian 12 minbase + python3, pip, curl,
#                                      ca-certificates, imported with `docker import`
#   wheels   .cache/wheels/{deps,project}  the project wheel and its dependencies, built on
#                                      the host (containers cannot reach PyPI)
#   sim      vllm-fleet/sim:dev        docker/sim.Dockerfile, entrypoint `python3 -m vllm_sim`
#   gateway  vllm-fleet/gateway:dev    docker/gateway.Dockerfile, entrypoint `python3 -m gateway`
#   all      base sim gateway
#
# Cached and idempotent: every step hashes its inputs and skips when the result for those
# inputs exists (images carry the hash in the label io.vllm-fleet.inputs). A changed source
# file under the project's packages rebuilds the project wheel and the images on top of it.
# FORCE=1 rebuilds anyway; VERBOSE=1 streams sub-command output (otherwise in .cache/logs/).
#
# stdout: one line per built or cached image: NAME IMAGE-ID SIZE-MiB. Progress on stderr.
# Needs: a running daemon (scripts/install-docker.sh); root and debootstrap for `base`.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BASE_IMAGE="vllm-fleet/base:bookworm"
SIM_IMAGE="vllm-fleet/sim:dev"
GATEWAY_IMAGE="vllm-fleet/gateway:dev"
BASE_SUITE="bookworm"
BASE_INCLUDE="python3,python3-pip,ca-certificates,curl"
# Bump when the base recipe below changes in a way the include list does not show.
BASE_RECIPE_VERSION="1"
WHEELS_DIR="$REPO_ROOT/.cache/wheels"
LABEL_INPUTS="io.vllm-fleet.inputs"
LABEL_IMAGE="io.vllm-fleet.image"
FORCE="${FORCE:-0}"
T_START="$(_now)"

usage() {
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

sha256_of() { sha256sum | cut -c1-16; }

image_label() { # IMAGE LABEL -> value, empty when the image or label is missing
    "$DOCKER" image inspect -f "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null | sed 's/^<no value>$//' || true
}

report_image() { # IMAGE: the stdout line for it
    "$DOCKER" image inspect -f '{{.Id}} {{.Size}}' "$1" \
        | awk -v n="$1" '{ printf "%s %s %.0f\n", n, substr($1, 8, 12), $2 / 1048576 }'
}

# ---------------------------------------------------------------------------------------
# base

# The Debian mirror this host uses (deb822 debian.sources, else sources.list). Never
# hard-coded: CI machines may point at another mirror. DEBIAN_MIRROR overrides.
debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local uri=""
    local f=/etc/apt/sources.list.d/debian.sources
    if [[ -f "$f" ]]; then
        uri="$(awk -v suite="$BASE_SUITE" 'BEGIN { RS = ""; FS = "\n" }
            { uri = ""; ok = 0; deb = 0
              for (i = 1; i <= NF; i++) {
                if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
                if ($i ~ /^Suites:/) { n = split($i, a, /[ \t]+/); for (j = 2; j <= n; j++) if (a[j] == suite) ok = 1 }
                if ($i ~ /^Types:/ && $i ~ /[ \t]deb([ \t]|$)/) deb = 1 }
              if (ok && deb && uri != "") { print uri; exit } }' "$f")"
    fi
    if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
        uri="$(awk -v suite="$BASE_SUITE" '$1 == "deb" { sub(/^deb[ \t]+(\[[^]]*\][ \t]+)?/, ""); if ($2 == suite) { print $1; exit } }' /etc/apt/sources.list)"
    fi
    [[ "$uri" =~ ^https?:// ]] || die "cannot find an http(s) Debian mirror for '$BASE_SUITE' in $f or /etc/apt/sources.list (got '${uri}'); set DEBIAN_MIRROR=http://..."
    echo "${uri%/}"
}

ROOTFS_TMP=""
cleanup_rootfs() {
    [[ -n "$ROOTFS_TMP" && -d "$ROOTFS_TMP" ]] || return 0
    # debootstrap mounts proc/sys inside the target; never delete through a mount.
    local m
    awk -v r="$ROOTFS_TMP/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r \
        | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    if awk -v r="$ROOTFS_TMP/" 'index($2, r) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        say "WARNING: mounts remain under $ROOTFS_TMP; not deleting it"
    else
        rm -rf --one-file-system "$ROOTFS_TMP"
    fi
    ROOTFS_TMP=""
}
trap cleanup_rootfs EXIT

build_base() {
    step_begin "base $BASE_IMAGE"
    local recipe
    recipe="$(echo "recipe=$BASE_RECIPE_VERSION suite=$BASE_SUITE variant=minbase include=$BASE_INCLUDE" | sha256_of)"
    if [[ "$FORCE" != 1 && "$(image_label "$BASE_IMAGE" "$LABEL_INPUTS")" == "$recipe" ]]; then
        step_cached "$BASE_IMAGE exists with inputs $recipe"
        return
    fi
    [[ "$(id -u)" == 0 ]] || die "debootstrap needs root"
    command -v debootstrap >/dev/null || die "debootstrap is missing; run: bash scripts/install-docker.sh"
    local mirror
    mirror="$(debian_mirror)"
    ROOTFS_TMP="$(mktemp -d "${TMPDIR:-/tmp}/vllm-fleet-rootfs.XXXXXX")"
    local rootfs="$ROOTFS_TMP/rootfs"
    run_logged base-debootstrap debootstrap --variant=minbase --include="$BASE_INCLUDE" \
        "$BASE_SUITE" "$rootfs" "$mirror" || die "debootstrap from $mirror failed (see above)"
    # Package caches are useless in an image; images that need packages run apt-get update.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/var/log/bootstrap.log
    say "    importing $(du -sh "$rootfs" | cut -f1) rootfs as $BASE_IMAGE"
    tar -C "$rootfs" --numeric-owner -c . | "$DOCKER" import \
        --change "LABEL $LABEL_IMAGE=base" \
        --change "LABEL $LABEL_INPUTS=$recipe" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$BASE_IMAGE" >/dev/null || die "docker import failed"
    cleanup_rootfs
    local pyver
    pyver="$("$DOCKER" run --rm --label "$LABEL_IMAGE=base-check" "$BASE_IMAGE" python3 -c 'import sys, pip; print(sys.version.split()[0], "pip", pip.__version__)')" \
        || die "$BASE_IMAGE was imported but python3/pip do not run in it"
    step_done "$BASE_IMAGE with python $pyver from $mirror"
}

# ---------------------------------------------------------------------------------------
# wheels

# The project's runtime dependencies, one per line, from pyproject.toml.
project_requirements() {
    "$PYTHON" - "$REPO_ROOT/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
PY
}

# Files that make the project wheel, relative to the repo root: pyproject.toml, README and
# LICENSE if present, and every file of the top-level packages that
# [tool.setuptools.packages.find] includes (minus bytecode).
project_source_files() {
    "$PYTHON" - "$REPO_ROOT" <<'PY'
import fnmatch, os, sys, tomllib
root = sys.argv[1]
with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    cfg = tomllib.load(f)
include = cfg.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {}).get("include", ["*"])
files = [n for n in ("pyproject.toml", "README.md", "LICENSE") if os.path.isfile(os.path.join(root, n))]
for top in sorted(os.listdir(root)):
    if not os.path.isfile(os.path.join(root, top, "__init__.py")):
        continue
    if not any(fnmatch.fnmatch(top, p) for p in include):
        continue
    for d, dirs, names in os.walk(os.path.join(root, top)):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        for n in sorted(names):
            if not n.endswith((".pyc", ".pyo")):
                files.append(os.path.relpath(os.path.join(d, n), root))
print("\n".join(files))
PY
}

deps_inputs() {
    { project_requirements; "$PYTHON" -c 'import sys, platform; print(sys.implementation.cache_tag, platform.machine())'; } | sha256_of
}

project_inputs() {
    (cd "$REPO_ROOT" && project_source_files | tr '\n' '\0' | xargs -0 sha256sum) | sha256_of
}

build_wheels() {
    step_begin "wheels (dependencies)"
    local deps="$WHEELS_DIR/deps" want
    want="$(deps_inputs)"
    if [[ "$FORCE" != 1 && -f "$deps/.inputs" && "$(cat "$deps/.inputs")" == "$want" ]]; then
        step_cached "$(find "$deps" -name '*.whl' | wc -l) wheels in .cache/wheels/deps for inputs $want"
    else
        rm -rf "$deps"
        mkdir -p "$deps"
        project_requirements >"$deps/requirements.txt"
        run_logged wheels-deps "$PYTHON" -m pip wheel --wheel-dir "$deps" -r "$deps/requirements.txt" \
            || die "pip wheel of the project's dependencies failed (see above)"
        local sdists
        sdists="$(find "$deps" -maxdepth 1 -type f ! -name '*.whl' ! -name requirements.txt)"
        [[ -z "$sdists" ]] || die "non-wheel files in $deps: $sdists"
        echo "$want" >"$deps/.inputs"
        step_done "$(find "$deps" -name '*.whl' | wc -l) wheels, $(du -sh "$deps" | cut -f1)"
    fi

    step_begin "wheels (project)"
    local proj="$WHEELS_DIR/project"
    want="$(project_inputs)"
    if [[ "$FORCE" != 1 && -f "$proj/.inputs" && "$(cat "$proj/.inputs")" == "$want" ]]; then
        step_cached "$(basename "$(find "$proj" -name '*.whl' | head -1)") for inputs $want"
        return
    fi
    # Build from a staged copy of exactly the hashed files: the working tree (including
    # files not committed yet) gets no build/ or *.egg-info litter.
    local stage
    stage="$(mktemp -d "${TMPDIR:-/tmp}/vllm-fleet-wheel.XXXXXX")"
    (cd "$REPO_ROOT" && project_source_files | tar -cf - -T -) | tar -xf - -C "$stage"
    # README.md is named in pyproject.toml; a wheel cannot be built without it.
    [[ -f "$stage/README.md" ]] || echo "vllm-fleet" >"$stage/README.md"
    rm -rf "$proj"
    mkdir -p "$proj"
    # A fixed SOURCE_DATE_EPOCH makes the wheel byte-identical for identical sources, so the
    # image layer that installs it is reused by Docker's cache (also under `docker compose build`).
    SOURCE_DATE_EPOCH=315532800 run_logged wheels-project "$PYTHON" -m pip wheel --no-deps \
        --wheel-dir "$proj" "$stage" || { rm -rf "$stage"; die "pip wheel of the project failed (see above)"; }
    rm -rf "$stage"
    echo "$want" >"$proj/.inputs"
    step_done "$(basename "$(find "$proj" -name '*.whl' | head -1)")"
}

# ---------------------------------------------------------------------------------------
# sim / gateway

build_app_image() { # KIND IMAGE DOCKERFILE
    local kind="$1" image="$2" dockerfile="$3"
    step_begin "$kind $image"
    local base_id inputs
    base_id="$("$DOCKER" image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null)" \
        || die "$BASE_IMAGE is missing; run: bash scripts/build-images.sh base"
    inputs="$({ echo "$base_id"; deps_inputs; project_inputs; cat "$REPO_ROOT/$dockerfile" \
        "$REPO_ROOT/$dockerfile.dockerignore" 2>/dev/null; } | sha256_of)"
    if [[ "$FORCE" != 1 && "$(image_label "$image" "$LABEL_INPUTS")" == "$inputs" ]]; then
        step_cached "$image exists with inputs $inputs"
        return
    fi
    local t old_id new_id
    t="$(_now)"
    old_id="$("$DOCKER" image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)"
    build_wheels
    STEP="$kind $image"
    # Debian's 20.10 client with BuildKit: RUN --mount=type=bind keeps the wheels out of
    # every layer. The context is the repo root; $dockerfile.dockerignore narrows it to
    # .cache/wheels/{deps,project}.
    DOCKER_BUILDKIT=1 run_logged "build-$kind" "$DOCKER" build --progress=plain \
        -f "$REPO_ROOT/$dockerfile" -t "$image" \
        --label "$LABEL_IMAGE=$kind" --label "$LABEL_INPUTS=$inputs" "$REPO_ROOT" \
        || die "docker build of $image failed (see above)"
    # Drop the image this build replaced, unless a container still uses it or it has other tags.
    new_id="$("$DOCKER" image inspect -f '{{.Id}}' "$image")"
    if [[ -n "$old_id" && "$old_id" != "$new_id" ]]; then
        "$DOCKER" rmi "$old_id" >/dev/null 2>&1 && say "    removed the previous $image (${old_id:7:12})" || true
    fi
    STEP_T0="$t"
    step_done "$image with inputs $inputs"
}

# ---------------------------------------------------------------------------------------

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(all)
for t in "${targets[@]}"; do
    case "$t" in
        base | wheels | sim | gateway | all) ;;
        -h | --help) usage ;;
        *) say "unknown target: $t"; usage ;;
    esac
done

require_daemon
mkdir -p "$REPO_ROOT/.cache"
exec 9>"$REPO_ROOT/.cache/build-images.lock"
if ! flock -n 9; then
    say "==> waiting for another scripts/build-images.sh to finish (lock .cache/build-images.lock)"
    flock -w 1800 9 || die "another build-images.sh held the lock for 30 minutes"
fi

declare -A done_=()
run_target() {
    [[ -z "${done_[$1]:-}" ]] || return 0
    done_[$1]=1
    case "$1" in
        base) build_base; report_image "$BASE_IMAGE" ;;
        wheels) build_wheels ;;
        sim) run_target base; build_app_image sim "$SIM_IMAGE" docker/sim.Dockerfile; report_image "$SIM_IMAGE" ;;
        gateway) run_target base; build_app_image gateway "$GATEWAY_IMAGE" docker/gateway.Dockerfile; report_image "$GATEWAY_IMAGE" ;;
        all) run_target base; run_target sim; run_target gateway ;;
    esac
}
for t in "${targets[@]}"; do
    run_target "$t"
done
say "==> build-images ${targets[*]}: ok  [$(_elapsed "$T_START")]"
