# syntax=docker/dockerfile:1
# The fedpneumo image: Flower's runtime (flower-superlink, flower-supernode,
# flower-superexec, flwr) plus our apps and every dependency they import.
# SuperLink, SuperNodes and the submitter all run this image (docker-compose.yml),
# so the ServerApp and ClientApps never install anything at run time.
#
#   docker build -t fedpneumo:0.1.0-flwr1.42.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
#       -t fedpneumo:0.1.0-flwr1.42.0-cuda .
FROM python:3.11.13-slim-bookworm

# Must satisfy pyproject's flwr bound (>=1.42,<1.43).
ARG FLWR_VERSION=1.42.0
# CPU wheels by default; a CUDA index (…/whl/cu126, …/whl/cu130) for GPUs.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_HOME=/home/app/.flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

RUN useradd --create-home --uid 1000 app
WORKDIR /app

# Heavy, rarely changing layers first: torch from the chosen index, then the
# project's dependencies (installed editable against empty package stubs, so
# this layer is rebuilt only when pyproject.toml changes).
RUN pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY pyproject.toml README.md ./
RUN for pkg in fedpneumo server_app client_app persistence benchmarks; do \
        mkdir -p "$pkg" && touch "$pkg/__init__.py"; \
    done \
    && pip install "flwr[simulation,dp]==${FLWR_VERSION}" -e . \
    && python -c "import flwr, torch; assert flwr.__version__ == '${FLWR_VERSION}', flwr.__version__"

COPY . .
# Named volumes copy these owners on first use.
RUN mkdir -p /data /outputs /state "${FLWR_HOME}" \
    && chown -R app:app /outputs /state /home/app

USER app
CMD ["fedpneumo", "--help"]
