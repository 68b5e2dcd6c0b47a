# syntax=docker/dockerfile:1
# POISE, CPU image: every service of the distributed mode, started as `poise serve <service>`
# (archive | proposer | implementer | trainer | evaluator | reflector), configured by POISE_* variables.
# The testbed trainer and evaluator run here; the VERL trainer needs Dockerfile.gpu.
#
#   docker build -t poise:cpu .
#   docker run --rm poise:cpu serve archive
#
# No secret is baked in: ANTHROPIC_API_KEY / OPENAI_API_KEY come from the environment (compose) or a
# Secret (k8s) at run time, and only into the services that call the LLM.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

# The CPU build of torch is not on PyPI: it comes from the PyTorch CPU index (override TORCH_INDEX_URL
# with a mirror of it where that index cannot be reached).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# torch first, in its own layer (the largest download; it changes only with constraints/cpu.txt).
# constraints/cpu.txt pins torch==2.13.0, which the index serves as 2.13.0+cpu.
COPY constraints/ constraints/
RUN pip install --index-url "${TORCH_INDEX_URL}" -c constraints/cpu.txt torch

# Then the project. The constraint keeps the torch installed above (2.13.0+cpu satisfies ==2.13.0), so pip
# never swaps in a CUDA build from PyPI.
COPY pyproject.toml README.md ./
COPY poise/ poise/
COPY app/ app/
COPY archive/ archive/
COPY proposer/ proposer/
COPY implementer/ implementer/
COPY trainer/ trainer/
COPY evaluator/ evaluator/
COPY reflector/ reflector/
# The testbed's base checkpoint ships as package data (pyproject.toml [tool.setuptools.package-data]).
RUN pip install -c constraints/cpu.txt . \
    && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && test -f "${site}/poise/testbed/base/default/model.safetensors" \
    && chmod -R a+rX "${site}/poise/testbed/base" \
    && python -m pip check

# -------------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}

# tini as PID 1: forwards SIGTERM to `poise serve` (which drains its current handler) and reaps the
# orphans that sandboxed candidate processes can leave behind.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

ARG POISE_UID=10001
RUN groupadd --system --gid "${POISE_UID}" poise \
    && useradd --system --uid "${POISE_UID}" --gid poise --home-dir /home/poise --create-home \
       --shell /usr/sbin/nologin poise \
    # the shared work volume (node directories, checkpoints); a fresh named volume inherits this owner
    && mkdir -p /var/lib/poise \
    && chown poise:poise /var/lib/poise

COPY --from=build /opt/venv /opt/venv

# Caches go to /tmp so that the root filesystem can be mounted read-only (compose read_only, k8s
# readOnlyRootFilesystem with an emptyDir on /tmp).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMETHEUS_DISABLE_CREATED_SERIES=True \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    POISE_WORK_DIR=/var/lib/poise \
    POISE_HTTP_PORT=8000

USER poise:poise
WORKDIR /var/lib/poise
EXPOSE 8000

ENTRYPOINT ["/usr/bin/tini", "--", "poise"]
CMD ["--help"]
