#!/usr/bin/env bash
# Build vllm-fleet/node:dev, the Docker-in-Docker Swarm node (and local registry) image the
# swarm test tier runs. Cached: rebuilt only when the base image or the Dockerfile changed.
#
#   bash scripts/build-node-image.sh
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NODE_IMAGE="${NODE_IMAGE:-vllm-fleet/node:dev}"
BASE_IMAGE="${BASE_IMAGE:-vllm-fleet/base:bookworm}"
DOCKERFILE="$REPO_ROOT/docker/node.Dockerfile"
T_START="$(_now)"

step_begin "node $NODE_IMAGE"
"$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
    || die "$BASE_IMAGE is missing; run: bash scripts/build-images.sh base"
inputs="$({ "$DOCKER" image inspect -f '{{.Id}}' "$BASE_IMAGE"; cat "$DOCKERFILE"; } | sha256sum | cut -c1-16)"
have="$("$DOCKER" image inspect -f '{{index .Config.Labels "io.vllm-fleet.inputs"}}' "$NODE_IMAGE" 2>/dev/null || true)"
if [[ "${FORCE:-0}" != 1 && "$have" == "$inputs" ]]; then
    step_cached "$NODE_IMAGE exists with inputs $inputs"
else
    # The legacy builder with the host's network: apt inside the build reaches the mirror.
    DOCKER_BUILDKIT=0 run_logged build-node "$DOCKER" build --network host \
        -f "$DOCKERFILE" -t "$NODE_IMAGE" --label "io.vllm-fleet.image=node" \
        --label "io.vllm-fleet.inputs=$inputs" "$REPO_ROOT/docker" \
        || die "docker build of $NODE_IMAGE failed (see above)"
    step_done "$NODE_IMAGE with inputs $inputs"
fi
say "==> build-node-image: ok  [$(_elapsed "$T_START")]"
