# pathways_lite: one image for every service of docker-compose.yml (Ray head, island nodes,
# controller). `--build-arg EXTRAS=gpu` installs JAX for CUDA 12 (pyproject's `gpu` extra,
# jax[cuda12]: the CUDA libraries come as pip wheels; the host needs the NVIDIA driver and
# the NVIDIA container toolkit). Build: docker compose build (or docker-compose.gpu.yml).
FROM python:3.11-slim

ARG EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /opt/pathways-lite

# Only what the wheel needs: setup.py generates the protobuf code from protos/ while it builds.
COPY pyproject.toml setup.py constraints.txt README.md ./
COPY protos/ protos/
COPY model/ model/
COPY workers/ workers/
COPY controller/ controller/
COPY pathways_lite/ pathways_lite/

RUN pip install --no-cache-dir -c constraints.txt ".${EXTRAS:+[$EXTRAS]}" \
    && python -c "import pathways_lite.v1.controller_pb2, pathways_lite.workers.discovery"

# Non-root; the compose volumes (state, datasets, checkpoints) are created owned by it.
RUN useradd --create-home --uid 1000 pathways \
    && mkdir -p /state /datasets /checkpoints \
    && chown pathways:pathways /state /datasets /checkpoints
USER pathways
WORKDIR /home/pathways

CMD ["pathways-lite", "--help"]
