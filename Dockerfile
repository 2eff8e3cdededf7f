# syntax=docker/dockerfile:1
#
# stream-detector: the anomaly-detector daemon (and the rest of the CLI) in one image.
#
#   docker build -t stream-detector .
#   docker run --rm -e STREAM_DETECTOR_KAFKA__BOOTSTRAP_SERVERS=broker:9092 -p 9108:9108 stream-detector
#   docker run --rm stream-detector config show          # any other subcommand works too
#
# pyproject.toml pins torch==2.13.0. From PyPI that is the CUDA build on x86-64 Linux (several
# GB). For a CPU-only image, add the PyTorch CPU wheel index:
#
#   docker build --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu -t stream-detector .
#
# (pip reads PIP_EXTRA_INDEX_URL from the environment; the index only lives in the build stage,
# so it does not end up in the final image's environment or history.)

# ---- build: install the project and its dependencies into a virtual environment ----
FROM python:3.11-slim AS build

ARG PIP_EXTRA_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# README* : pyproject.toml names README.md as the long description; copy it when present.
COPY pyproject.toml README* ./
COPY stream_detector ./stream_detector
COPY config/detector.yaml ./config/detector.yaml
RUN pip install --no-cache-dir .
# Validating the default config builds its pipeline, which compiles the numba kernels into the
# image (numba caches them next to the installed sources): otherwise every new container
# spends ~10 s compiling before it scores anything.
RUN stream-detector config validate config/detector.yaml

# ---- runtime: the virtual environment, the default config, a non-root user ----
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 detector \
 && useradd --system --uid 10001 --gid detector --create-home --home-dir /home/detector \
        --shell /usr/sbin/nologin detector

COPY --from=build /opt/venv /opt/venv
# The defaults, documented. Mount your own file over it (read-only is fine) or override single
# settings with STREAM_DETECTOR_<SECTION>__<KEY> environment variables.
COPY config/detector.yaml /etc/stream-detector/detector.yaml

USER detector
WORKDIR /home/detector

# Prometheus metrics, /healthz and /readyz (metrics.port).
EXPOSE 9108

# /healthz answers 200 as soon as the metrics server is up (/readyz also waits for partition
# assignment). slim has no curl, so ask with Python. Follows STREAM_DETECTOR_METRICS__PORT when
# that is set; if metrics.port is changed in the YAML instead, change this too or use
# `docker run --no-healthcheck`. Disable it (healthcheck: disable) for non-daemon commands.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STREAM_DETECTOR_METRICS__PORT', '9108'), timeout=4)"]

ENTRYPOINT ["stream-detector"]
CMD ["run", "--config", "/etc/stream-detector/detector.yaml"]
