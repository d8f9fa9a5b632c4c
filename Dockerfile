# syntax=docker/dockerfile:1
# The kvroute router image, ghcr.io/kvroute/kvroute:<version>:
#
#   docker build -t ghcr.io/kvroute/kvroute:0.1.0 .
#   docker build --build-arg EXTRAS= -t kvroute:static .   # without k8s discovery
#
# Two stages: the builder builds the kvroute wheel and installs it with its dependencies
# into /opt/venv (docker/install.sh, which tests/packaging also runs against a bare venv);
# the final stage copies only that venv onto the same slim Python. No torch, no vLLM, no
# compilers: the router serves every feature that needs no GPU, including tiers with the
# classifier shipped inside the wheel (kvroute/classifier/artifacts).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvroute/ kvroute/
COPY router/ router/
COPY classifier/ classifier/
COPY benchmarks/ benchmarks/
COPY docker/install.sh docker/
# Extras of the kvroute package to install: "k8s" (the default) lets discovery.source k8s
# watch worker pods, as the Helm chart does by default; "" leaves it out.
ARG EXTRAS=k8s
RUN sh docker/install.sh /src /opt/venv "${EXTRAS}"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kvroute" \
      org.opencontainers.image.description="Prefix-aware, cost-aware router for vLLM fleets" \
      org.opencontainers.image.source="https://github.com/kvroute/kvroute" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/hf-home
# A fixed UID/GID (the Helm chart's runAsUser/runAsGroup), numeric in USER so that
# runAsNonRoot can check it.
RUN groupadd --system --gid 10001 kvroute \
    && useradd --system --uid 10001 --gid kvroute --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin kvroute
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8080
# GET /health answers 200 while the router runs (its body says ok or degraded). Slim has no
# curl; set KVROUTE_HEALTH_URL when the config moves the port, or to https:// with
# server.tls (the probe of its own process does not check the certificate).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; urllib.request.urlopen(os.environ.get('KVROUTE_HEALTH_URL', 'http://127.0.0.1:8080/health'), timeout=4, context=c)"]
ENTRYPOINT ["kvroute"]
CMD ["serve", "--config", "/etc/kvroute/config.yaml"]
