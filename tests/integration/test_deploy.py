"""The deployment: Dockerfile, docker-compose.yml and deploy/haproxy.cfg, without Docker.

The files are checked statically (the Compose Specification's schema, the Dockerfile's
instructions, ``haproxy -c``), then the HAProxy configuration runs for real, in a loopback
variant, in front of three real gateways sharing a real Redis.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import Cluster
from tests.deploy_support import (
    COMPOSE_FILE,
    COMPOSE_SCHEMA,
    COMPOSE_TLS_FILE,
    DOCKERFILE,
    DOCKERIGNORE,
    HAPROXY_CFG,
    ROOT,
    HaproxyProcess,
    Instruction,
    compose_duration,
    compose_environment,
    dockerfile_stages,
    exec_form,
    haproxy_exe,
    published_ports,
    running_haproxy,
)
from tests.support import ChatClient, T, free_port, run_cli
from tests.tls_support import Certificates, common_name

pytestmark = pytest.mark.integration

RESTART_NOTICE = "* Server restarting: please reconnect."
#: Connection attempts a reconnecting test client makes before giving up.
RECONNECT_ATTEMPTS = 5


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def compose_tls() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_TLS_FILE.read_text())
    return loaded


def haproxy_section(header: str) -> list[str]:
    """The settings of one section of deploy/haproxy.cfg (``frontend chat``), comments and
    blank lines left out."""
    match = re.search(
        rf"^{re.escape(header)}\n((?:[ \t]+.*\n|[ \t]*\n)*)",
        HAPROXY_CFG.read_text(),
        flags=re.MULTILINE,
    )
    assert match is not None, f"deploy/haproxy.cfg has no `{header}`"
    lines = [line.split("#", 1)[0].strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line]


def final_stage() -> list[Instruction]:
    return dockerfile_stages(DOCKERFILE.read_text())[-1]


# ---- docker-compose.yml -----------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    """docker-compose.yml validates against the Compose Specification's JSON schema."""
    if not COMPOSE_SCHEMA.is_file():
        pytest.fail(
            f"the Compose Specification schema is missing: expected {COMPOSE_SCHEMA} "
            "(shared/schemas/compose-spec.json beside the repository)"
        )
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: list(e.path)
    )
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in errors
    )
    assert set(compose()["services"]) == {"redis", "gateway", "lb", "admin", *MONITORING}


def test_compose_redis_is_private_healthy_and_durable() -> None:
    """Redis publishes no port, has a `redis-cli ping` health check, and keeps its data in
    an append-only file (fsync every second, no snapshots) on a named volume."""
    redis = compose()["services"]["redis"]
    assert re.fullmatch(r"redis:7(\.\d+)*(-alpine)?", redis["image"]), redis["image"]
    assert "ports" not in redis
    assert redis["healthcheck"]["test"][:1] in (["CMD"], ["CMD-SHELL"])
    assert "redis-cli" in redis["healthcheck"]["test"][1]
    assert "ping" in " ".join(redis["healthcheck"]["test"][1:])
    command = redis["command"]
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert redis["volumes"] == ["redis-data:/data"]
    assert "redis-data" in compose()["volumes"]


def test_compose_gateway_scales_behind_the_balancer() -> None:
    """The gateway publishes no host port (so `--scale` works), waits for a healthy Redis,
    checks its own health, serves /health where HAProxy looks, serves the web page on its
    web port, and has time to drain."""
    gateway = compose()["services"]["gateway"]
    assert gateway["build"] in (".", {"context": "."})
    assert "ports" not in gateway
    assert {"5555", "8000", "8080"} <= {str(p) for p in gateway["expose"]}
    env = compose_environment(gateway)
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["CHAT_HEALTH_PORT"] == "8080"
    assert env["CHAT_WEB_PORT"] == "8000"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    test = gateway["healthcheck"]["test"]
    assert test[0] == "CMD" and "gateway.health" in test, test
    # The drain takes at most about 7 s; Docker's SIGKILL must not come first.
    assert compose_duration(gateway["stop_grace_period"]) >= 10
    assert gateway["restart"] == "unless-stopped"


WEB_PORTS = ("8000", "8000")
#: The services of the `monitoring` profile (README.md, "Metrics and logs").
MONITORING = ("prometheus", "grafana")


def test_compose_lb_is_the_one_published_port() -> None:
    """Only the load balancer publishes ports: 5555 unless CHAT_PORT says otherwise, and the
    web port 8000 unless CHAT_WEB_PORT does, with deploy/haproxy.cfg mounted read-only where
    the official image reads it."""
    services = compose()["services"]
    lb = services["lb"]
    assert re.fullmatch(r"haproxy:\d+\.\d+.*", lb["image"]), lb["image"]
    assert published_ports(lb) == [("5555", "5555"), WEB_PORTS]
    assert lb["ports"] == ["${CHAT_PORT:-5555}:5555", "${CHAT_WEB_PORT:-8000}:8000"]
    default_stack = {name: s for name, s in services.items() if "profiles" not in s}
    assert [name for name, s in default_stack.items() if "ports" in s] == ["lb"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    assert "gateway" in lb["depends_on"]


def test_compose_lb_is_healthy_only_while_haproxy_serves() -> None:
    """The lb container's health check asks HAProxy's own monitor frontend (so `docker
    compose up --wait` fails when HAProxy cannot start), which fails while no gateway is up;
    nothing else probes it, and it is not published."""
    lb = compose()["services"]["lb"]
    test = lb["healthcheck"]["test"]
    assert test[0] == "CMD", test
    cfg = HAPROXY_CFG.read_text()
    monitor = re.search(r"^frontend monitor\n((?:[ \t]+.*\n)+)", cfg, flags=re.MULTILINE)
    assert monitor is not None, "deploy/haproxy.cfg has no `frontend monitor`"
    body = monitor.group(1)
    port = re.search(r"^[ \t]+bind[ \t]+:(\d+)$", body, flags=re.MULTILINE)
    uri = re.search(r"^[ \t]+monitor-uri[ \t]+(\S+)$", body, flags=re.MULTILINE)
    assert port is not None and uri is not None, body
    assert f"/dev/tcp/127.0.0.1/{port.group(1)}" in test[-1]
    assert f"GET {uri.group(1)} " in test[-1]
    assert re.search(r"monitor fail if \{ nbsrv\(gateways\) lt 1 \}", body), body
    assert published_ports(lb) == [("5555", "5555"), WEB_PORTS]
    # `bash -c`: /dev/tcp is bash's; `$` would be Compose's interpolation.
    assert test[1:3] == ["bash", "-c"] and "$" not in test[-1]


def test_compose_names_its_project_and_lets_gateways_name_themselves() -> None:
    """A fixed project name gives containers the names README.md's `docker stop` uses, and
    no CHAT_GATEWAY_ID is set, so that each gateway takes its container's name as its id."""
    services = compose()["services"]
    assert compose()["name"] == "chat-service"
    assert "CHAT_GATEWAY_ID" not in compose_environment(services["gateway"])


def test_compose_admin_runs_on_demand_with_the_gateway_image() -> None:
    """`admin` is chat-admin on the gateway's image and Redis, in a profile so that `up`
    leaves it out and `docker compose run --rm admin who` runs it."""
    services = compose()["services"]
    admin, gateway = services["admin"], services["gateway"]
    assert "admin" in admin["profiles"]
    assert admin["entrypoint"] == ["chat-admin"]
    assert admin["command"] == ["who"]
    assert admin["image"] == gateway["image"]
    assert compose_environment(admin)["REDIS_URL"] == compose_environment(gateway)["REDIS_URL"]
    assert all(
        "profiles" not in s for name, s in services.items() if name not in {"admin", *MONITORING}
    )


def test_compose_monitoring_is_a_profile_apart() -> None:
    """Prometheus and Grafana start only with `--profile monitoring`: the default stack
    neither starts nor waits for them (CI's compose stage has no image of theirs), they
    publish on loopback only, and mount the deploy/ files that configure them."""
    services = compose()["services"]
    for name in MONITORING:
        service = services[name]
        assert service["profiles"] == ["monitoring"], name
        assert all(str(port).startswith("127.0.0.1:") for port in service["ports"]), name
        for volume in service["volumes"]:
            source = volume.split(":", 1)[0]
            assert source.startswith("./deploy/") and (ROOT / source).exists(), volume
    assert re.fullmatch(r"prom/prometheus:v[\d.]+", services["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:[\d.]+", services["grafana"]["image"])
    for name, service in services.items():
        if "profiles" not in service:
            assert not set(service.get("depends_on", ())) & set(MONITORING), name
    assert set(compose()["volumes"]) == {"redis-data"}
    published = [published_ports(services[name])[0][1] for name in MONITORING]
    assert published == ["9090", "3000"]


def test_compose_and_haproxy_cfg_agree() -> None:
    """HAProxy listens on the port Compose publishes, and finds the gateways under their
    service name, on their chat port, health-checking the port they serve /health on."""
    services = compose()["services"]
    cfg = HAPROXY_CFG.read_text()
    bind = re.search(r"^[ \t]+bind[ \t]+\S*:(\d+)", cfg, flags=re.MULTILINE)
    assert bind is not None
    assert published_ports(services["lb"])[0] == ("5555", bind.group(1))
    template = re.search(
        r"^[ \t]+server-template[ \t]+\S+[ \t]+(\d+)[ \t]+([^:\s]+):(\d+)[ \t]+(.*)$",
        cfg,
        flags=re.MULTILINE,
    )
    assert template is not None
    count, host, port, params = template.groups()
    assert host == "gateway" and host in services
    assert port in services["gateway"]["expose"]
    check_port = re.search(r"(?<!\S)port (\d+)", params)
    assert check_port is not None
    assert check_port.group(1) == compose_environment(services["gateway"])["CHAT_HEALTH_PORT"]
    assert int(count) >= 3
    assert "init-addr none" in params


def test_compose_tls_override_is_valid_and_off_by_default() -> None:
    """docker-compose.tls.yml validates against the Compose Specification and only adds
    to the gateway and lb services; without it no gateway is given TLS settings and no
    TLS port is published, so the default stack needs no certificate."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(compose_tls()))
    assert not errors, "\n".join(e.message for e in errors)
    assert set(compose_tls()["services"]) == {"gateway", "lb"}
    for name, service in compose()["services"].items():
        assert not any(k.startswith("CHAT_TLS") for k in compose_environment(service)), name
    assert all(port[1] != "6697" for port in published_ports(compose()["services"]["lb"]))


def test_compose_tls_override_agrees_with_haproxy_cfg() -> None:
    """With the override the gateways serve TLS on the port HAProxy's TLS backend connects
    to, from a certificate and key on a read-only mount, and the lb publishes HAProxy's
    TLS frontend (6697 unless CHAT_TLS_PORT says otherwise) beside 5555."""
    gateway, lb = compose_tls()["services"]["gateway"], compose_tls()["services"]["lb"]
    env = compose_environment(gateway)
    template = next(s for s in haproxy_section("backend gateways_tls") if "server-template" in s)
    host_port = re.search(r"\s([^:\s]+):(\d+)\s", template)
    assert host_port is not None, template
    assert host_port.groups() == ("gateway", env["CHAT_TLS_PORT"])
    assert env["CHAT_TLS_PORT"] in gateway["expose"]
    (mount,) = gateway["volumes"]
    source, target, mode = mount.split(":")
    assert source == "./deploy/tls" and mode == "ro"
    for key in ("CHAT_TLS_CERT", "CHAT_TLS_KEY"):
        assert env[key].startswith(target + "/"), env
    (bind,) = [s for s in haproxy_section("frontend chat_tls") if s.startswith("bind ")]
    assert published_ports(lb) == [("6697", bind.rsplit(":", 1)[1])]
    assert lb["ports"] == ["${CHAT_TLS_PORT:-6697}:6697"]
    assert "deploy/tls/" in (ROOT / ".gitignore").read_text().splitlines()


def test_haproxy_cfg_passes_tls_through_to_the_gateways_as_it_routes_5555() -> None:
    """The TLS frontend is TCP passthrough (no certificate in HAProxy: TLS ends at the
    gateways), and its backend picks and checks the gateways exactly as the plain one
    does, on their TLS port, with the same /health check."""
    frontend = haproxy_section("frontend chat_tls")
    assert frontend == ["bind :6697", "default_backend gateways_tls"]
    plain, tls = haproxy_section("backend gateways"), haproxy_section("backend gateways_tls")
    assert not any(re.search(r"\b(ssl|crt|mode http)\b", line) for line in frontend + tls)
    assert [line.replace(":5555 ", ":6697 ") for line in plain] == tls


def test_compose_and_haproxy_cfg_agree_on_the_web_port() -> None:
    """HAProxy's web frontend listens on the web port Compose publishes and sends browsers
    to the gateways' web port, with the same health check, DNS and slots as the chat
    backend: the web port is routed as 5555 is."""
    services = compose()["services"]
    cfg = HAPROXY_CFG.read_text()
    frontend = re.search(r"^frontend web\n((?:[ \t]+.*\n)+)", cfg, flags=re.MULTILINE)
    assert frontend is not None, "deploy/haproxy.cfg has no `frontend web`"
    bind = re.search(r"^[ \t]+bind[ \t]+\S*:(\d+)$", frontend.group(1), flags=re.MULTILINE)
    backend_name = re.search(r"^[ \t]+default_backend[ \t]+(\S+)$", frontend.group(1), re.M)
    assert bind is not None and backend_name is not None
    assert published_ports(services["lb"])[1] == (WEB_PORTS[0], bind.group(1))
    backend = re.search(
        rf"^backend {backend_name.group(1)}\n((?:[ \t]+.*\n?)+)", cfg, flags=re.MULTILINE
    )
    assert backend is not None
    templates = re.findall(
        r"^[ \t]+server-template[ \t]+\S+[ \t]+(\d+)[ \t]+([^:\s]+):(\d+)[ \t]+(.*)$",
        cfg,
        flags=re.MULTILINE,
    )
    gateway_web_port = compose_environment(services["gateway"])["CHAT_WEB_PORT"]
    (web,) = [t for t in templates if t[2] == gateway_web_port]
    (chat,) = [t for t in templates if t[2] == "5555"]
    assert web[3] in backend.group(1)
    assert web[0] == chat[0] and web[1] == chat[1] == "gateway"
    assert web[3] == chat[3], "the web backend checks the gateways as the chat backend does"
    # Balancing and checks are in `defaults`, for both backends alike.
    assert "balance" not in backend.group(1) and "default-server" not in backend.group(1)


# ---- Dockerfile -------------------------------------------------------------------------


def test_dockerfile_final_stage_is_slim_and_ships_only_the_venv() -> None:
    """Multi-stage: the final stage is a python:*-slim image that copies the builder's venv
    and nothing from the build context, and installs no compiler."""
    stages = dockerfile_stages(DOCKERFILE.read_text())
    assert len(stages) >= 2
    final = stages[-1]
    image = next(w for w in final[0].args.split() if not w.startswith("--"))
    assert re.fullmatch(r"python:3\.\d+(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image)
    copies = [i for i in final if i.keyword in ("COPY", "ADD")]
    assert copies, "the final stage copies nothing from the builder"
    for instruction in copies:
        assert instruction.keyword == "COPY" and "--from=" in instruction.args, instruction
    build_tools = re.compile(
        r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libc6?-dev|musl-dev)\b"
    )
    for instruction in final:
        if instruction.keyword == "RUN" and re.search(r"\b(apt-get|apt|apk)\b", instruction.args):
            assert not (
                re.search(r"\b(install|add)\b", instruction.args)
                and build_tools.search(instruction.args)
            ), f"line {instruction.line}: build tools in the final stage: {instruction.args}"


def test_dockerfile_runs_the_gateway_as_non_root_with_a_health_check() -> None:
    """The final stage runs chat-gateway as a non-root user, exposes the chat and health
    ports, health-checks itself with the gateway's probe and stops on SIGTERM."""
    final = final_stage()
    keywords = [i.keyword for i in final]
    users = [i for i in final if i.keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), users[-1]
    starts = [n for n, k in enumerate(keywords) if k in ("ENTRYPOINT", "CMD")]
    assert starts and final.index(users[-1]) < min(starts)
    # The command a container runs: the last ENTRYPOINT followed by the last CMD.
    command = [
        word
        for keyword in ("ENTRYPOINT", "CMD")
        for form in [exec_form(i) for i in final if i.keyword == keyword][-1:]
        for word in form
    ]
    assert command[:1] == ["chat-gateway"], command

    exposed = {w.split("/")[0] for i in final if i.keyword == "EXPOSE" for w in i.words()}
    assert {"5555", "8000", "8080"} <= exposed
    env = dict(w.split("=", 1) for i in final if i.keyword == "ENV" for w in i.words() if "=" in w)
    assert env.get("CHAT_HEALTH_PORT") == "8080"

    (healthcheck,) = [i for i in final if i.keyword == "HEALTHCHECK"]
    assert exec_form(healthcheck)[:3] == ["python", "-m", "gateway.health"]
    assert [i.args for i in final if i.keyword == "STOPSIGNAL"][-1:] == ["SIGTERM"]


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    """The virtual environment, git history, tool caches, tests, CI, benchmarks and
    deployment files never reach the builder, which copies the whole context."""
    patterns = {
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()[:1] != "#"
    }
    assert {".venv", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"} <= patterns
    assert "**/__pycache__" in patterns
    assert {"tests", ".ci", "bench", "deploy"} <= patterns
    assert "!README.md" in patterns  # pyproject.toml's `readme`


def test_dockerfile_builds_from_its_base_image_alone_and_any_package() -> None:
    """No `# syntax=` directive (it would pull a frontend image from a registry first), and
    the builder copies the source tree as a whole: a new top-level package needs no edit."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, flags=re.IGNORECASE | re.MULTILINE)
    builder = dockerfile_stages(text)[0]
    copies = [i.words() for i in builder if i.keyword == "COPY"]
    assert [".", "."] in copies, copies


# ---- deploy/haproxy.cfg -----------------------------------------------------------------


def test_haproxy_cfg_is_valid() -> None:
    """`haproxy -c` accepts deploy/haproxy.cfg as is, although `gateway` does not resolve
    here: `init-addr none` lets HAProxy start before DNS knows any gateway."""
    result = subprocess.run(
        [haproxy_exe(), "-c", "-f", str(HAPROXY_CFG)],
        capture_output=True,
        text=True,
        timeout=2 * T,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr
    assert "[ALERT]" not in result.stderr


def haproxy_seconds(value: str) -> float:
    """An HAProxy time: a number in milliseconds unless it carries a unit."""
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert match is not None, f"not an HAProxy time: {value!r}"
    number, unit = match.groups()
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit or "ms"]
    return int(number) * scale


def test_haproxy_cfg_suits_long_lived_chat_connections() -> None:
    """TCP mode with hour-long idle timeouts; gateways found through Docker's DNS and
    checked on /health; sessions kept when a gateway is marked down (a draining gateway
    sends its clients away itself)."""
    lines = [line.split("#", 1)[0].strip() for line in HAPROXY_CFG.read_text().splitlines()]
    settings = [line for line in lines if line]
    assert "mode tcp" in settings
    assert "balance leastconn" in settings
    timeouts = dict(line.split()[1:3] for line in settings if line.startswith("timeout "))
    for name in ("client", "server", "tunnel"):
        assert haproxy_seconds(timeouts[name]) >= 3600, (name, timeouts[name])
    assert "option httpchk GET /health" in settings
    assert "http-check expect status 200" in settings
    assert "nameserver dns 127.0.0.11:53" in settings
    assert not any("shutdown-sessions" in line for line in settings)
    # The end-to-end tests follow HAProxy through these log lines.
    assert {"option tcplog", "option log-health-checks"} <= set(settings)


def test_haproxy_cfg_gives_up_fast_on_a_vanished_gateway() -> None:
    """A stopped gateway's address answers nothing: each try there costs `timeout connect`
    before a retry goes elsewhere, and a moved user may meet up to three such addresses on a
    scale-down (three retries), within a 2-second budget that also holds the client's
    backoff. The first failure takes the server out (`observe layer4`); the connection
    is retried on another gateway (tests/compose measures the whole gap: under 2 s)."""
    lines = [line.split("#", 1)[0].strip() for line in HAPROXY_CFG.read_text().splitlines()]
    settings = [line for line in lines if line]
    timeouts = dict(line.split()[1:3] for line in settings if line.startswith("timeout "))
    assert haproxy_seconds(timeouts["connect"]) <= 0.25
    # One, in `defaults`, for every backend (chat, web and TLS) alike.
    default_servers = [line for line in settings if line.startswith("default-server ")]
    assert len(default_servers) == 1, default_servers
    for default_server in default_servers:
        assert "observe layer4 error-limit 1 on-error mark-down" in default_server
    assert "retries 3" in settings and "option redispatch 1" in settings


# ---- HAProxy in front of real gateways --------------------------------------------------


@pytest.fixture
async def balancer(cluster: Cluster) -> AsyncIterator[HaproxyProcess]:
    """Three gateways with health endpoints behind the loopback HAProxy, which has seen
    each pass its health check. HAProxy's server gwN is cluster.gateways[N - 1] (gw-N)."""
    gateways = await cluster.start(3, "--health-port", "0")
    async with running_haproxy(free_port(), [(g.port, g.health_port) for g in gateways]) as lb:
        yield lb


async def who(cluster: Cluster) -> dict[str, str]:
    """Everyone online, by name, with the id of the gateway holding them."""
    status, out, err = await run_cli(
        "chat-admin", "--redis-url", cluster.redis.url, "who", "--json"
    )
    assert status == 0, err
    return {user["name"]: user["gateway"] for user in json.loads(out)}


async def user_via(lb: HaproxyProcess, cluster: Cluster, name: str) -> ChatClient:
    """A client logged in as ``name`` through the balancer; the cluster closes it."""
    client = await ChatClient.connect(lb.port)
    cluster.clients.append(client)
    await client.login(name)
    return client


async def read_lines(client: ChatClient, count: int) -> list[str]:
    return [await client.readline() for _ in range(count)]


async def reconnect(lb: HaproxyProcess, name: str) -> tuple[ChatClient, int]:
    """What a chat client does on the restart notice: connect again to the same address
    and log in under the same name. Returns the client and the attempts it took."""
    for attempt in range(1, RECONNECT_ATTEMPTS + 1):
        client = await ChatClient.connect(lb.port)
        try:
            # A name refused as taken fails the test here: login() wants the welcome.
            await client.login(name)
            return client, attempt
        except (EOFError, ConnectionError):
            # HAProxy found no gateway to take the connection: back off as a client would.
            await client.close()
            await asyncio.sleep(0.05 * T * attempt)
    raise AssertionError(f"{name} could not reconnect in {RECONNECT_ATTEMPTS} attempts")


async def test_haproxy_spreads_clients_and_moves_a_draining_gateways_users(
    cluster: Cluster, balancer: HaproxyProcess
) -> None:
    """Through the real HAProxy and its configuration: clients on one port are spread
    evenly over three gateways and share one room; when one gateway is SIGTERMed its users
    are told to reconnect, reconnect through the same port under the same names, land on
    the surviving gateways, and the others see each leave then rejoin; HAProxy's health
    check takes the stopped gateway out of rotation."""
    lb = balancer
    # Six users, one after the other: leastconn gives each gateway two.
    users: dict[str, ChatClient] = {}
    for name in ["alice", "bruno", "chen", "dana", "emil", "fatou"]:
        client = await ChatClient.connect(lb.port)
        cluster.clients.append(client)
        welcome = await client.login(name)
        assert re.match(rf"\* Welcome, {name}! {len(users) + 1} users? online\.", welcome)
        for other in users.values():
            assert await other.readline() == f"* {name} joined the chat"
        users[name] = client
    where = await who(cluster)
    assert Counter(where.values()) == {"gw-1": 2, "gw-2": 2, "gw-3": 2}, where

    await users["alice"].send("hello from behind the balancer")
    for client in users.values():
        assert await client.readline() == "alice: hello from behind the balancer"

    stopping = cluster.gateways[0]
    moved = sorted(n for n, g in where.items() if g == stopping.gateway_id)
    stayed = [n for n in users if n not in moved]
    stopping.signal(signal.SIGTERM)
    for name in moved:
        assert await users[name].expect(RESTART_NOTICE) == [RESTART_NOTICE]
        assert await users[name].at_eof()
        # Hang up, as a client does on EOF. gw1 then holds no connection, so leastconn
        # offers it to the next client first unless HAProxy has marked it down already.
        await users[name].close()
        await lb.connection_closed(users[name])
    for name in stayed:
        assert sorted(await read_lines(users[name], len(moved))) == [
            f"* {n} left the chat" for n in moved
        ]

    # The movers reconnect at once, as real clients do on the notice.
    results = await asyncio.gather(*(reconnect(lb, name) for name in moved))
    for name, (client, _attempts) in zip(moved, results, strict=True):
        cluster.clients.append(client)
        users[name] = client
    for name in stayed:
        assert sorted(await read_lines(users[name], len(moved))) == [
            f"* {n} joined the chat" for n in moved
        ]
    where = await who(cluster)
    assert sorted(where) == sorted(users)
    assert Counter(where.values()) == {"gw-2": 3, "gw-3": 3}, where

    await users[moved[0]].send("back on another gateway")
    for name, client in users.items():
        seen = await client.expect(f"{moved[0]}: back on another gateway")
        # A mover may first see the other mover's join, and its history on rejoining;
        # nothing else comes between.
        allowed = {f"* {n} joined the chat" for n in moved if n != name}
        live = [line for line in seen[:-1] if not line.startswith("* [history ")]
        assert set(live) <= (allowed if name in moved else set()), (name, seen)

    assert await stopping.wait(3 * T) == 0
    await lb.wait_for_log(r"Server \S+/gw1 is DOWN")
    assert lb.log is not None
    assert not re.search(r"Server \S+/gw[23] is DOWN", lb.log.text()), lb.log.text()
    # Each mover got in at the first try, though leastconn offered them gw1 first unless
    # HAProxy had already marked it down: a connection the draining gateway refuses is
    # redispatched to another gateway (`option redispatch`), never shown to the client.
    assert [attempts for _client, attempts in results] == [1] * len(moved)


async def test_haproxy_passes_tls_through_to_the_gateways(cluster: Cluster, tmp_path: Path) -> None:
    """Through the real HAProxy's TLS frontend, TLS clients reach the gateways' TLS port,
    spread by leastconn and checking the gateways' own certificate (HAProxy holds none),
    and share the room with a client of the plain frontend."""
    certs = Certificates(tmp_path)
    certs.issue(common_name="gateways")
    gateways = await cluster.start(2, "--health-port", "0", *certs.gateway_args())
    servers = [(g.port, g.health_port) for g in gateways]
    tls = (free_port(), [g.tls_port for g in gateways])
    async with running_haproxy(free_port(), servers, tls=tls) as lb:
        plain = await user_via(lb, cluster, "plain")
        secure = []
        for name in ["ana", "bruno"]:
            client = await ChatClient.connect(tls[0], tls=certs.client_context())
            cluster.clients.append(client)
            await client.login(name)
            # The gateways' own certificate: HAProxy relayed the handshake untouched.
            assert common_name(client.writer.get_extra_info("peercert")) == "gateways"
            secure.append(client)
        where = await who(cluster)
        assert where["ana"] != where["bruno"], where
        await secure[0].send("over TLS through HAProxy")
        assert await plain.expect("ana: over TLS through HAProxy")
        assert await secure[1].expect("ana: over TLS through HAProxy")
        # HAProxy logs each connection as it ends (`option tcplog`), naming its route.
        port = secure[1].writer.get_extra_info("sockname")[1]
        await secure[1].close()
        logged = await lb.wait_for_log(rf"^127\.0\.0\.1:{port} \[.*")
        assert re.search(r" chat_tls gateways_tls/gw[12] ", logged.group(0)), logged.group(0)


async def test_haproxy_sends_newcomers_to_the_gateway_with_fewest_users(
    cluster: Cluster, balancer: HaproxyProcess
) -> None:
    """leastconn: after two users of one gateway leave, the next two clients both go to
    that gateway, where round robin would have sent them on round the rotation."""
    users = {name: await user_via(balancer, cluster, name) for name in "abcdef"}
    where = await who(cluster)
    assert Counter(where.values()) == {"gw-1": 2, "gw-2": 2, "gw-3": 2}, where
    leaving = [n for n, g in where.items() if g == "gw-2"]
    for name in leaving:
        await users[name].send("/quit")
        await users[name].expect(f"* Goodbye, {name}!")
        assert await users[name].at_eof()
        await users[name].close()
        await balancer.connection_closed(users[name])
    for name in ["g", "h"]:
        await user_via(balancer, cluster, name)
    where = await who(cluster)
    assert [where["g"], where["h"]] == ["gw-2", "gw-2"], where
