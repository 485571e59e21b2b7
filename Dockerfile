# GPU image: vLLM 0.32 (CUDA build) and llm-gateway, serving the example GPU
# config, or one mounted under /app/configs and named after the image:
#
#   docker build -t llm-gateway .
#   docker run --init --stop-timeout 90 --gpus all -p 127.0.0.1:8000:8000 \
#     -v $PWD/configs:/app/configs llm-gateway --config configs/gateway.yaml
#
# (--init and --stop-timeout: README, "Docker".)
# The versions below must match pyproject.toml (a test checks it).
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# gcc and Python's headers: Triton compiles its CUDA launcher (a C extension)
# the first time an engine runs a kernel, on the CUDA runtime base image too.
# curl: the HEALTHCHECK below; wget: KubeRay's probes of the Ray containers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev gcc curl wget \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Dependencies first: they change far less often than the code. The project's
# own dependencies install from pyproject.toml alone (empty packages and
# README stand in), so a change to the code, README or configs reinstalls
# only the project itself.
RUN pip install "vllm==0.32.0" "ray[serve]==2.60.0"
COPY pyproject.toml ./
RUN mkdir gateway models && touch README.md gateway/__init__.py models/__init__.py \
    && pip install ".[gpu,mlflow]" && rm -rf build *.egg-info gateway models README.md
COPY README.md ./
COPY gateway ./gateway
COPY models ./models
COPY configs ./configs
RUN pip install --no-deps --force-reinstall .

# The gateway runs unprivileged: a process that a request could subvert (an
# engine's tokenizer, a model's own code, Ray's workers) gets no root in the
# container. It writes only to its home (the Hugging Face cache, vLLM's and
# Triton's compile caches) and /tmp (Ray's session); /app stays root's. The
# cache directory exists here, owned by the user: a volume mounted on it
# would otherwise have Docker create ~/.cache as root, and vLLM could not
# make its compile cache beside it. USER is numeric, the ids fixed: Kubernetes
# checks `runAsNonRoot` against a uid, never a name (deploy/kuberay runs the
# pods as 1000:1000).
RUN groupadd --gid 1000 gateway && useradd --create-home --uid 1000 --gid 1000 gateway \
    && install -d -o gateway -g gateway /home/gateway/.cache /home/gateway/.cache/huggingface
USER 1000:1000

EXPOSE 8000
# Alive: /health answers, 200 or, with operations keys configured (`ops: true`), 401 to a
# probe that has none (no key is put in the image or its environment for it). It probes
# port 8000, the entrypoint's: a `--port` given as the command must come with a
# `--health-cmd` of its own (docker run) or the container reads as unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD code=$(curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/health) \
        && { [ "$code" = 200 ] || [ "$code" = 401 ]; } || exit 1
ENTRYPOINT ["llm-gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--config", "configs/examples/gpu.yaml"]
