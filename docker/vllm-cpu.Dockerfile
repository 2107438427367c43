# vllm-fleet/vllm-cpu:0.32.0: the real vLLM 0.32.0 CPU build, used like vllm/vllm-openai:
#
#   docker run --shm-size 1g -p 127.0.0.1:8000:8000 -v "$PWD/models:/models:ro" \
#       vllm-fleet/vllm-cpu:0.32.0 --model /models/tiny-a --dtype float32 \
#       --gpu-memory-utilization 0.1
#
# Built by scripts/build-vllm-image.sh with the wheel directory (.cache/vllm-wheels, holding
# the wheels and requirements.txt = docker/vllm-cpu.requirements.txt) as the build context.
# Needs BuildKit (DOCKER_BUILDKIT=1 /usr/bin/docker build); no `# syntax=` line on purpose.
#
# On the CPU backend --gpu-memory-utilization is the fraction of host memory for the KV
# cache (the default 0.92 fails on a 24 GiB machine; 0.1 works). Give the container
# --shm-size 1g or --ipc=host: Docker's 64 MiB /dev/shm kills vLLM after ~24 s.
ARG BASE_IMAGE=vllm-fleet/base:bookworm
FROM ${BASE_IMAGE}

# libnuma1: the CPU backend's thread binding; g++ and python3-dev: vLLM compiles kernels at
# startup (InvalidCxxCompiler / "Python.h: No such file" without them); python3-venv: pip.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libnuma1 g++ python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/vllm

# The wheels are bind-mounted for this one step: none of them lands in a layer.
RUN --mount=type=bind,target=/wheels \
    /opt/vllm/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
        --find-links /wheels --no-deps --require-hashes -r /wheels/requirements.txt

# No usage reports and no Hub look-ups: the image serves local model directories.
ENV PATH=/opt/vllm/bin:$PATH \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1

# Fail the build, not the first container, when an import is broken.
RUN python3 -c "import torch, vllm.entrypoints.openai.api_server as s; print('vllm', __import__('vllm').__version__, 'torch', torch.__version__)"

LABEL io.vllm-fleet.image="vllm-cpu" \
      org.opencontainers.image.title="vllm-fleet/vllm-cpu" \
      org.opencontainers.image.description="vLLM 0.32.0 CPU build, OpenAI-compatible server (like vllm/vllm-openai)" \
      org.opencontainers.image.version="0.32.0"

EXPOSE 8000
# `vllm serve` fails in this distribution (it asks for the package named `vllm`); the module
# entry point takes the same flags. A later --port overrides an earlier one.
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
