# vitq with its pinned dependencies: the image for MLflow's server and for cpu workers.
# CUDA workers: build FROM an NVIDIA TensorRT image instead and `pip install tensorrt` there.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/vitq
COPY pyproject.toml constraints.txt README.md ./
COPY vitq vitq
COPY tasks tasks
COPY flows flows
RUN pip install --no-cache-dir -c constraints.txt .
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false
