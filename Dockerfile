# syntax=docker/dockerfile:1
# imagegen: one image for the gRPC service (the default command), the HTTP gateway and the
# admin CLI. docs/kubernetes.md shows how the Kubernetes manifests use it.
#
#   docker build -t imagegen:0.1.0 .
#   docker run --rm imagegen:0.1.0                       # imagegen-service (gRPC :50051)
#   docker run --rm imagegen:0.1.0 imagegen-gateway      # the HTTP gateway (:8080)
#   docker run --rm imagegen:0.1.0 imagegen-admin db upgrade
#
# Both stages use the same base image, so the virtualenv's interpreter links stay valid.
# Pin it further by digest (python:3.11-slim-bookworm@sha256:...) with --build-arg.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: the project and its dependencies in /opt/venv ------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# The pinned dependencies first, in their own layer: a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt

COPY imagegen_service ./imagegen_service
COPY http_gateway ./http_gateway
# The built-in default_config.toml is not in the wheel's package data yet: put it beside the
# installed package (no-op once packaging ships it), then prove the install works: the
# entry points import, and both configurations load.
RUN pip install --no-deps . \
    && cp -n imagegen_service/default_config.toml \
        "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/imagegen_service/" \
    && python -m compileall -q /opt/venv/lib \
    && python -c "from imagegen_service.config import load_config; from http_gateway.config import load_gateway_config; load_config({}); load_gateway_config({})" \
    && imagegen-admin --help > /dev/null

# ---- runtime: the virtualenv on a clean base, as an unprivileged user -------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="imagegen" \
      org.opencontainers.image.description="OpenAI-compatible image-generation API: gRPC service, HTTP gateway, admin CLI" \
      org.opencontainers.image.licenses="Apache-2.0"

# uid/gid 10001 matches runAsUser/fsGroup in k8s/. A passwd entry keeps libraries that ask
# for the user name (getpass) working. The data directory is the default working directory.
RUN groupadd --system --gid 10001 imagegen \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/imagegen --shell /usr/sbin/nologin imagegen \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/imagegen

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IMAGEGEN_LOG_FORMAT=json
WORKDIR /var/lib/imagegen
USER 10001:10001

# gRPC service, HTTP gateway, service metrics.
EXPOSE 8080 50051 9090

# Exec form: no shell at run time; the process is PID 1 and gets SIGTERM directly.
CMD ["imagegen-service"]
