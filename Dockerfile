# The image the manifests in k8s/ run: CUDA runtime, Python 3.11, the pinned stack, this project.
#   docker build -t ldm:0.1.0 .   (then push it where the cluster pulls, and set the image in
#   k8s/ or pass `ldm k8s CONFIG --image REGISTRY/ldm:0.1.0`)
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git \
    && rm -rf /var/lib/apt/lists/*
COPY --from=ghcr.io/astral-sh/uv:0.9.5 /uv /usr/local/bin/uv

ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true

RUN uv python install 3.11.13 && uv venv --python 3.11.13 /opt/venv \
    && uv pip install setuptools==80.9.0 wheel==0.45.1
# torch first, as a CUDA build of the pinned version; then DeepSpeed against it (no ops are
# compiled ahead: the training uses torch's AdamW, so none are needed at run time either).
RUN uv pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
RUN uv pip install --no-build-isolation deepspeed==0.19.8

WORKDIR /app
COPY pyproject.toml README.md ./
COPY core ./core
COPY models ./models
COPY data_pipeline ./data_pipeline
COPY training ./training
COPY orchestrator ./orchestrator
COPY configs ./configs
RUN uv pip install --no-build-isolation . && rm -rf /root/.cache

# Non-root, as the pods' securityContext demands (runAsUser 1000).
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin ldm
USER 1000:1000
ENV HOME=/home/ldm
CMD ["ldm", "--help"]
