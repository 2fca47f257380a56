# pathways_lite: one image for every service of docker-compose.yml (Ray head, island nodes,
# controller). `--build-arg EXTRAS=gpu` installs JAX for CUDA 12 (pyproject's `gpu` extra,
# jax[cuda12]: the CUDA libraries come as pip wheels; the host needs the NVIDIA driver and
# the NVIDIA container toolkit). Build: docker compose build (or docker-compose.gpu.yml).
#
# BASE: any Debian-like image with Python 3.11-3.13, or none at all: on a base without a
# Python that can make a venv (plain Debian, `deploy/base-image.sh`'s debootstrapped
# bookworm) Debian's python3 and python3-venv are installed with apt. The project always
# goes into a venv (/opt/venv, first on PATH): Debian's Python refuses pip installs into the
# system (PEP 668), and a venv keeps the image the same on either kind of base.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade "pip>=24"

WORKDIR /opt/pathways-lite

# The dependencies first, in a layer of their own (pyproject's list, pinned by constraints):
# a change to the code rebuilds only the layers after it.
COPY pyproject.toml constraints.txt ./
RUN python -c "import sys, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in sys.argv[1].split(',') if e]; \
print('\n'.join(p['dependencies'] + [r for e in extras for r in p['optional-dependencies'][e]]))" \
        "$EXTRAS" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Only what the wheel needs: setup.py generates the protobuf code from protos/ while it builds.
COPY setup.py README.md ./
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
