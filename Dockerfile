# CPU image (the CUDA image is Dockerfile.cuda); docs/docker.md has the build and run commands.
# Nothing secret is in it: .dockerignore keeps .env (and data/, logs/) out of the build context, and
# .env is passed at run time with `docker run --env-file .env`.
# Pinned by exact tag; Python 3.12, as in the CUDA image (Ubuntu 24.04's python3). Another base with
# python (3.10+), its venv module and headers can be passed: `--build-arg BASE_IMAGE=...`
# (scripts/docker_check.sh builds on a Debian bookworm base it makes with mmdebstrap).
ARG BASE_IMAGE=python:3.12.12-slim-bookworm
FROM ${BASE_IMAGE}

# The CPU wheels of the two pins in pyproject.toml (a mirror of this index may be passed instead).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# W&B stays offline unless the run-time environment (.env) says WANDB_MODE=online.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    WANDB_MODE=offline

# g++: torch.compile's CPU kernels (optimizer.compiled=true) are C++ that inductor compiles at run
# time. apt versions are not pinned (Debian's security updates replace them in place, so a pin
# would break the build); the base image tag is the pin.
# uid 1000: files the runs write into a mounted logs/ belong to the usual first user of the host.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 genie \
    && useradd --create-home --uid 1000 --gid genie genie \
    && python -m venv /opt/venv \
    && pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 --index-url "${TORCH_INDEX_URL}"

# The other dependencies get a layer of their own, so that editing src/ or README.md does not
# reinstall them; the package itself is then built from a throwaway copy of the sources (its
# metadata reads README.md).
WORKDIR /tmp/genie-dg
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /tmp/genie-dg \
    && mkdir -p /app/data /app/logs \
    && chown genie:genie /app /app/data /app/logs

# The entry point (Hydra's configs ship inside the package); runs write under /app/logs and read datasets from /app/data
# (DATA_DIR=./data), both meant to be mounted.
WORKDIR /app
COPY train.py ./

USER 1000:1000
CMD ["python", "train.py"]
