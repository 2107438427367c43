# vllm-fleet/gateway:dev - the OpenAI-compatible gateway (package gateway). The registry is
# mounted at run time:
#   docker run -v "$PWD/models.toml:/etc/vllm-fleet/models.toml:ro" -p 127.0.0.1:8000:8000 \
#       vllm-fleet/gateway:dev            (flags of `python -m gateway` go after the image)
# Inside compose, set GATEWAY_UPSTREAM_HOST so it reaches the model services by name.
#
# Build: bash scripts/build-images.sh gateway   (it builds the base image and the wheels
# first), or `docker compose build` once the wheels exist (see docker/README.md).
# Context: the repo root; gateway.Dockerfile.dockerignore lets only .cache/wheels/{deps,project}
# in. The wheels are bind-mounted for the install steps, so none lands in a layer, and pip
# never reaches the network (--no-index). No `# syntax=` line: BuildKit would try to pull it.
FROM vllm-fleet/base:bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Same two steps as sim.Dockerfile, so both images share these layers.
RUN --mount=type=bind,source=.cache/wheels/deps,target=/wheels \
    python3 -m pip install --no-index --find-links /wheels --break-system-packages \
        -r /wheels/requirements.txt
RUN --mount=type=bind,source=.cache/wheels/project,target=/wheels \
    python3 -m pip install --no-index --no-deps --break-system-packages /wheels/*.whl

ENV GATEWAY_HOST=0.0.0.0 \
    FLEET_REGISTRY=/etc/vllm-fleet/models.toml
EXPOSE 8000
ENTRYPOINT ["python3", "-m", "gateway"]
