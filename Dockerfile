# One image for the coordinator and the workers: docker-compose.yml gives each its `loracast ... serve` command.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . .
# The README's setup (the Makefile), with PyTorch's CPU build: PyPI's default Linux wheel carries CUDA libraries
# the containers would never use.
RUN make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" \
    && rm -rf /root/.cache/pip

# Adapters, the de-quantized base model and the worker's ONNX export live here (a volume per service in compose).
ENV LORACAST_CACHE=/var/lib/loracast
# De-quantize the shipped base model at build time, not at every fresh container's first start; the image's copy
# seeds each new named volume mounted at this path.
RUN .venv/bin/python -c "from loracast import base_model; base_model.resolve()"

EXPOSE 50051 50052 9101 9102
ENTRYPOINT ["/app/.venv/bin/loracast"]
