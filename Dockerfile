# syntax=docker/dockerfile:1
#
# meshdns container image.
#
#   docker build -t meshdns:0.1.0 .
#   docker run --rm -p 15053:15053/udp -p 15053:15053/tcp -p 15080:15080 -p 9153:9153 \
#       -e MESHDNS_API_TOKEN=... meshdns:0.1.0
#
# MESHDNS_API_TOKEN is required: the baked config's API listens on 0.0.0.0, and
# without a token meshdns refuses to start (the container exits at once with
# status 2 and "api.token: is required when api.listen is not a loopback address").
#
# Two stages: the first builds a wheel of meshdns (and nothing else) from the
# sources; the second installs that wheel and its dependencies into a venv at
# /opt/meshdns on a clean base, so no build tooling or source tree reaches the
# runtime image. tests/system/test_deploy.py replays both stages in a fresh venv and
# runs this ENTRYPOINT + CMD, since no Docker engine runs in CI.

ARG PYTHON_IMAGE=python:3.12-slim

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY meshdns ./meshdns
RUN pip wheel --no-deps --wheel-dir /wheels .

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="meshdns" \
      org.opencontainers.image.description="Sidecar-local DNS resolver for service-mesh names, fed over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/meshdns \
    PATH=/opt/meshdns/bin:$PATH

# The wheel is bind-mounted from the build stage, so it never becomes a layer.
# pip compiles the .pyc files at install time: the image runs fine with a
# read-only root filesystem. The baked config is checked at build time; the token
# it requires is given at run time, so a placeholder stands in for the check only
# (a RUN's environment does not reach the image).
COPY deploy/container/config.yaml /etc/meshdns/config.yaml
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/meshdns \
    && /opt/meshdns/bin/pip install /wheels/meshdns-*.whl \
    && groupadd --system --gid 10001 meshdns \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
         --home-dir /var/lib/meshdns --shell /usr/sbin/nologin meshdns \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/meshdns \
    && MESHDNS_API_TOKEN=build-time-check-only meshdns check-config /etc/meshdns/config.yaml

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/meshdns

# DNS (UDP and TCP), the HTTP API (/v1 with the token, /healthz, /readyz) and
# metrics.listen (/metrics, /healthz, /readyz, open and read-only).
EXPOSE 15053/udp 15053/tcp 15080/tcp 9153/tcp

# No curl in the image: the venv's Python asks /healthz on the metrics port. Override
# the URL with MESHDNS_HEALTHCHECK_URL when a mounted config moves metrics.listen (or
# drops it: then /healthz is on api.listen, http://127.0.0.1:15080/healthz).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('MESHDNS_HEALTHCHECK_URL', 'http://127.0.0.1:9153/healthz'), timeout=2)"]

# Exec form: meshdns is PID 1 and gets SIGTERM from `docker stop` / the kubelet
# directly; it stops serving and exits 0.
ENTRYPOINT ["meshdns", "serve"]
CMD ["--config", "/etc/meshdns/config.yaml"]
