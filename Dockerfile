# weather-restore: run the pipeline (dvc repro), a Prefect worker, or `weather-restore restore`.
#   docker build -t weather-restore .
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 -t weather-restore:cuda .
# The CPU default is a pinned slim Python; a CUDA base must provide python3.11+ and pip.
ARG BASE=python:3.11.7-slim-bookworm
FROM ${BASE}

# WEATHER_RESTORE_REPO: the checkout that prefect.yaml's pull step moves a flow run into (docker work pool).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=true \
    WEATHER_RESTORE_PROGRESS=0 \
    WEATHER_RESTORE_REPO=/home/weather/weather-restore

# git: DVC needs a repository; the rest of the runtime comes as wheels (PyAV ships FFmpeg).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.39.* \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 weather
WORKDIR /home/weather/weather-restore
COPY --chown=weather:weather . .
RUN pip install --no-cache-dir -e . \
    && git config --system --add safe.directory /home/weather/weather-restore

USER 1000:1000
# Prefect's and MLflow's servers bind to localhost unless the user asks otherwise.
CMD ["dvc", "repro"]
