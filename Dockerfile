# GPU image: vLLM 0.32 (CUDA build) and llm-gateway, serving a config mounted
# at /app/configs/gateway.yaml (defaults to the example GPU config).
#
#   docker build -t llm-gateway .
#   docker run --gpus all -p 8000:8000 -v $PWD/configs:/app/configs llm-gateway
#
# The versions below must match pyproject.toml (a test checks it).
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv curl \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Dependencies first: they change far less often than the code.
RUN pip install "vllm==0.32.0" "ray[serve]==2.60.0"
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY models ./models
COPY configs ./configs
RUN pip install ".[gpu,mlflow]"

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["llm-gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--config", "configs/examples/gpu.yaml"]
