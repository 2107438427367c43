# vllm-fleet/node:dev - a Docker-in-Docker Swarm node for the swarm test tier, and the image
# the tier's local registry runs from (Debian's docker-registry package).
#   docker run ... vllm-fleet/node:dev dockerd --host unix:///var/run/docker.sock ...
#   docker run ... vllm-fleet/node:dev docker-registry serve /etc/registry.yml
# Build: bash scripts/build-node-image.sh (with --network host: apt reaches the mirror the
# base image was made from).
FROM vllm-fleet/base:bookworm
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        docker.io iproute2 iptables docker-registry \
    && rm -rf /var/lib/apt/lists/*
