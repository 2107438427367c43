# vllm-fleet/sim:dev - the vLLM simulator (package vllm_sim), a stand-in for vllm/vllm-openai
# that takes vLLM's flags as container arguments:
#   docker run -p 127.0.0.1:8000:8000 vllm-fleet/sim:dev --model m --served-model-name a b --port 8000
#
# Build: bash scripts/build-images.sh sim   (it builds the base image and the wheels first).
# Context: the repo root; sim.Dockerfile.dockerignore lets only .cache/wheels/{deps,project}
# in. The wheels are bind-mounted for the install steps, so none lands in a layer, and pip
# never reaches the network (--no-index). No `# syntax=` line: BuildKit would try to pull it.
FROM vllm-fleet/base:bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Dependencies first (changes rarely), then the project wheel (changes with every edit).
# Same two steps as gateway.Dockerfile, so both images share these layers.
RUN --mount=type=bind,source=.cache/wheels/deps,target=/wheels \
    python3 -m pip install --no-index --find-links /wheels --break-system-packages \
        -r /wheels/requirements.txt
RUN --mount=type=bind,source=.cache/wheels/project,target=/wheels \
    python3 -m pip install --no-index --no-deps --break-system-packages /wheels/*.whl

EXPOSE 8000
ENTRYPOINT ["python3", "-m", "vllm_sim"]
