# The chat gateway image (chat-admin and chat-client come with it).
#
#   docker build -t chat-service .
#   docker run --rm -e REDIS_URL=redis://redis:6379/0 -p 5555:5555 chat-service
#
# Or the whole cluster behind one port: docker compose up --build --scale gateway=3
# (docker-compose.yml). tests/integration/test_deploy.py lints this file.
#
# No `# syntax=` line: that would make every build fetch a Dockerfile frontend image from a
# registry first; Docker's built-in frontend handles everything used here (RUN --mount
# included), so a build needs nothing but its base image.

# ---- builder: build the project and its dependencies into a self-contained venv ----------
# Both stages must use the same base image: the venv's `python` is a symlink to the base
# image's interpreter (/usr/local/bin/python3.11), so only the venv needs copying.
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# --without-pip: pip (and setuptools) stay in the builder; the runtime venv holds only the
# application and its dependencies, all of which ship as wheels (lupa included), so no
# compiler is needed even here.
RUN python -m venv --without-pip /opt/venv

WORKDIR /src
# The source tree as .dockerignore leaves it: pyproject.toml, README.md (its `readme`) and the
# packages, whatever packages pyproject.toml declares, so a new one needs no edit here.
# Tests, CI, benchmarks and deployment files are ignored, and only the venv reaches the
# final stage anyway.
COPY . .
# The builder's pip installs into the venv's interpreter (--python). The cache mount speeds
# up rebuilds without leaving a pip cache in any layer. pip byte-compiles what it installs,
# so the non-root runtime user never needs to write .pyc files.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip --python /opt/venv/bin/python install .

# ---- runtime ---------------------------------------------------------------------------
FROM python:3.11-slim

# A fixed numeric uid/gid, so `USER` below is verifiably non-root (Kubernetes'
# runAsNonRoot needs a number) and file ownership is predictable across rebuilds.
RUN groupadd --system --gid 10001 chat \
    && useradd --system --uid 10001 --gid chat --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin chat

# Owned by root and read-only to the service user: the application cannot rewrite itself.
COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    CHAT_HEALTH_PORT=8080

USER 10001:10001

# 5555: the chat protocol (PROTOCOL.md); 6697: the same over TLS, once --tls-port 6697 (or
# CHAT_TLS_PORT) and a certificate are given (docker-compose.tls.yml); 8000: the web page and
# its WebSocket, when turned on (CHAT_WEB_PORT=8000, as compose does); 8080: GET /health
# for load balancers and probes.
EXPOSE 5555 6697 8000 8080

# Healthy while the gateway is live in Redis and subscribed to the room (gateway/health.py).
# start-period covers the gateway's default --redis-wait of 30 s at start-up.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-m", "gateway.health", "--port", "8080"]

# SIGTERM drains the gateway: clients are told to reconnect, their leaves are announced, and
# it exits 0 within about 7 s, well inside `docker stop`'s default 10 s (Compose gives 15 s).
# chat-gateway is PID 1 and handles SIGTERM and SIGINT itself; it starts no child
# processes, so it needs no init to reap them.
STOPSIGNAL SIGTERM

# Flags go after the image name (`docker run chat-service --log-level debug`); every flag
# also has an environment variable (README.md, "Configuration").
ENTRYPOINT ["chat-gateway"]
