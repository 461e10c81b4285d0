# CPU image by default. CUDA variant: build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# and run with `docker run --gpus all ...` (see README, "Docker").
FROM python:3.11.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    WANDB_MODE=offline

RUN useradd --create-home --uid 1000 genie
WORKDIR /app
RUN chown genie:genie /app \
    && pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .
COPY conf ./conf
COPY train.py ./

# Secrets (.env, WANDB_API_KEY) are passed at run time, never baked into the image.
USER 1000:1000
CMD ["python", "train.py"]
