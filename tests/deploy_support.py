"""The deployment files as tests read them, and a real HAProxy to run in front of gateways.

No Docker engine is needed: docker-compose.yml is checked against the Compose
Specification's schema, the Dockerfile is read instruction by instruction, and
deploy/haproxy.cfg is both validated by ``haproxy -c`` and run, turned into a loopback
variant (:func:`loopback_haproxy_config`) that keeps everything but the addresses.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import ChatClient, LogWatcher, T

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
#: The override that turns TLS on (README.md, "Encrypted connections (TLS)").
COMPOSE_TLS_FILE = ROOT / "docker-compose.tls.yml"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
#: Shared files sit beside the repository, in a fresh clone as in a work tree.
COMPOSE_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"


# ---- Compose ----------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def compose_duration(text: str) -> float:
    """Seconds in a Compose duration such as ``15s``, ``1m30s`` or ``500ms``."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Compose duration: {text!r}")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment``, whichever of its two forms (map or KEY=VALUE list)."""
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose_defaults(text: str) -> str:
    """``text`` as Compose interpolates it with none of its variables set: ``${VAR:-x}`` and
    ``${VAR-x}`` become ``x``, ``${VAR}`` becomes empty."""
    return _VARIABLE.sub(lambda m: m.group(2) or "", text)


def published_ports(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host port, container port) for each of a service's ``ports``, short or long form,
    with variables at their defaults."""
    result = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            published = compose_defaults(str(port.get("published", "")))
            result.append((published, compose_defaults(str(port["target"]))))
        else:
            fields = compose_defaults(str(port)).split("/")[0].split(":")
            result.append((fields[-2] if len(fields) > 1 else "", fields[-1]))
    return result


# ---- Dockerfile -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined, comments dropped."""

    keyword: str
    args: str
    line: int

    def words(self) -> list[str]:
        return shlex.split(self.args)


def dockerfile_stages(text: str) -> list[list[Instruction]]:
    """The Dockerfile's build stages, each a list of instructions starting with its FROM."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        # Docker drops comment lines (directives included) and blank lines, even in the
        # middle of a continued instruction.
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([])
        if not stages:
            raise ValueError(f"line {instruction.line}: {instruction.keyword} before any FROM")
        stages[-1].append(instruction)
    return stages


def exec_form(instruction: Instruction) -> list[str]:
    """The command of an exec-form (JSON array) CMD, ENTRYPOINT or HEALTHCHECK CMD."""
    match = re.search(r"\[.*\]\s*$", instruction.args)
    if match is None:
        raise AssertionError(f"line {instruction.line}: not in exec form: {instruction.args}")
    command: list[str] = json.loads(match.group(0))
    return command


# ---- HAProxy ----------------------------------------------------------------------------


def haproxy_exe() -> str:
    exe = shutil.which("haproxy")
    if exe is None:
        raise RuntimeError(
            "haproxy is not installed: the deployment tests need it "
            "(Debian: apt-get install haproxy; .ci/run installs it)"
        )
    return exe


def _substitute(pattern: str, replace: str, text: str, what: str) -> str:
    new, count = re.subn(pattern, replace, text, flags=re.MULTILINE)
    if count != 1:
        raise AssertionError(
            f"deploy/haproxy.cfg: expected exactly one {what}, found {count}; "
            "update loopback_haproxy_config() to the config's new shape"
        )
    return new


#: One section of an HAProxy configuration: its indented (and blank) lines after the header.
_SECTION = r"(?:[ \t]+.*\n|[ \t]*\n)*"


def _in_section(text: str, header: str, change: Callable[[str], str]) -> str:
    """``text`` with the section headed ``header`` (e.g. ``frontend chat``) changed."""
    match = re.search(rf"^{re.escape(header)}\n{_SECTION}", text, flags=re.MULTILINE)
    if match is None:
        raise AssertionError(
            f"deploy/haproxy.cfg: no `{header}` section; "
            "update loopback_haproxy_config() to the config's new shape"
        )
    return text[: match.start()] + change(match.group(0)) + text[match.end() :]


def _local_servers(body: str, servers: Sequence[tuple[int, ...]]) -> str:
    """A backend's DNS-filled ``server-template`` as one ``server`` per local gateway:
    same parameters minus the DNS ones, checking each gateway's own health port."""
    template = re.search(
        r"^([ \t]+)server-template[ \t]+(\S+)[ \t]+\S+[ \t]+\S+(.*)$", body, flags=re.MULTILINE
    )
    if template is None:
        raise AssertionError("deploy/haproxy.cfg: no server-template line to replace")
    indent, prefix, params = template.groups()
    dns_only = r"(?<!\S)(resolvers|resolve-prefer|resolve-net|resolve-opts|init-addr)\s+\S+"
    params = " ".join(re.sub(dns_only, "", params).split())
    check_port = r"(?<!\S)port \d+"
    if not re.search(check_port, params):
        raise AssertionError("deploy/haproxy.cfg: the server-template checks no `port`")
    lines = [
        f"{indent}server {prefix}{i} 127.0.0.1:{port} "
        + re.sub(check_port, f"port {health_port}", params)
        for i, (port, health_port, *_) in enumerate(servers, 1)
    ]
    return body[: template.start()] + "\n".join(lines) + body[template.end() :]


def _local_bind(port: int) -> Callable[[str], str]:
    return lambda body: _substitute(
        r"^([ \t]+bind[ \t]+)\S*:\d+", rf"\g<1>127.0.0.1:{port}", body, "bind line"
    )


def loopback_haproxy_config(
    text: str,
    frontend_port: int,
    servers: Sequence[tuple[int, ...]],
    check_inter: str = "500ms",
    tls: tuple[int, Sequence[int]] | None = None,
    web_port: int | None = None,
) -> str:
    """deploy/haproxy.cfg made to run on this host in front of local gateways.

    ``servers`` are (chat port, health port) or (chat port, health port, web port) tuples;
    ``tls``, if the gateways serve TLS, is the TLS frontend's port and each gateway's TLS
    port (in the order of ``servers``); ``web_port``, if the gateways serve the web page,
    is the web frontend's port (each gateway's web port is the third of its tuple).
    Only what cannot work outside Docker changes; mode, balance, timeouts, retries and the
    health check stay as they are:

    * the chat frontend binds ``127.0.0.1:frontend_port`` instead of every address (the TLS
      frontend ``127.0.0.1`` and its port), and the load balancer's own health frontend
      (``monitor``, for Docker) goes; without ``tls`` the TLS frontend and its backend go,
      without ``web_port`` the web frontend and its backend;
    * each backend's DNS-filled ``server-template`` becomes one ``server`` per gateway with
      the same parameters, minus the DNS ones (resolvers, resolve-*, init-addr), checking
      each gateway's own health port; the ``resolvers`` section goes;
    * checks run every ``check_inter`` so a test sees state changes quickly;
    * a global ``maxconn`` of 1000: HAProxy would otherwise size itself from this host's
      descriptor limit (the container gets 65536 from docker-compose.yml).
    """
    text = _substitute(rf"^resolvers \S+\n{_SECTION}", "", text, "resolvers section")
    text = _substitute(rf"^frontend monitor\n{_SECTION}", "", text, "monitor frontend")
    text = _substitute(r"^global\n", "global\n    maxconn 1000\n", text, "global section")
    text = _in_section(text, "frontend chat", _local_bind(frontend_port))
    text = _in_section(text, "backend gateways", lambda body: _local_servers(body, servers))
    if tls is None:
        text = _substitute(rf"^frontend chat_tls\n{_SECTION}", "", text, "TLS frontend")
        text = _substitute(rf"^backend gateways_tls\n{_SECTION}", "", text, "TLS backend")
    else:
        tls_frontend_port, tls_ports = tls
        assert len(tls_ports) == len(servers), (tls_ports, servers)
        tls_servers = [(port, health) for port, (_, health) in zip(tls_ports, servers, strict=True)]
        text = _in_section(text, "frontend chat_tls", _local_bind(tls_frontend_port))
        text = _in_section(
            text, "backend gateways_tls", lambda body: _local_servers(body, tls_servers)
        )
    if web_port is None:
        text = _substitute(rf"^frontend web\n{_SECTION}", "", text, "web frontend")
        text = _substitute(rf"^backend web\n{_SECTION}", "", text, "web backend")
    else:
        web_servers = [(server[2], server[1]) for server in servers]
        text = _in_section(text, "frontend web", _local_bind(web_port))
        text = _in_section(text, "backend web", lambda body: _local_servers(body, web_servers))
    text, count = re.subn(
        r"^([ \t]+default-server\b.*\binter[ \t]+)\S+",
        rf"\g<1>{check_inter}",
        text,
        flags=re.MULTILINE,
    )
    if count == 0:
        raise AssertionError("deploy/haproxy.cfg: no default-server line with `inter`")
    return text


def haproxy_servers(config: str) -> list[str]:
    """Every ``backend/server`` of an HAProxy configuration (no templates left)."""
    names = []
    backend = ""
    for line in config.splitlines():
        if header := re.match(r"^backend[ \t]+(\S+)", line):
            backend = header.group(1)
        elif server := re.match(r"^[ \t]+server[ \t]+(\S+)", line):
            names.append(f"{backend}/{server.group(1)}")
    return names


class HaproxyProcess:
    """A real ``haproxy`` in the foreground, logging to a pipe (``log stdout``)."""

    def __init__(self, config: str, port: int, web_port: int | None = None) -> None:
        self.config = config
        self.port = port
        #: The web frontend's port, if the configuration has one.
        self.web_port = web_port
        self.proc: asyncio.subprocess.Process | None = None
        self.log: LogWatcher | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="chat-haproxy-"))

    async def start(self, servers: Sequence[str]) -> None:
        """Start; return once each of ``servers`` (``backend/server`` names) has passed its
        first health check, which happens after the frontends are bound."""
        path = self._dir / "haproxy.cfg"
        path.write_text(self.config)
        self.proc = await asyncio.create_subprocess_exec(
            haproxy_exe(), "-db", "-f", str(path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.log = LogWatcher(self.proc.stdout, f"haproxy :{self.port}")
        for name in servers:
            await self.wait_for_log(rf"Health check for server {re.escape(name)} succeeded")

    async def wait_for_log(self, pattern: str, timeout: float = 3 * T) -> re.Match[str]:
        assert self.log is not None
        try:
            return await self.log.wait_for(pattern, timeout)
        except TimeoutError:
            raise AssertionError(
                f"haproxy did not log {pattern!r} in {timeout:.0f}s:\n{self.log.text()}"
            ) from None

    async def connection_closed(self, client: ChatClient) -> None:
        """Return once HAProxy has finished with ``client``'s connection, gateway side
        included: `option tcplog` logs each connection, from its client address, as it ends.
        Until then leastconn still counts it against its gateway."""
        port = client.writer.get_extra_info("sockname")[1]
        await self.wait_for_log(rf"^127\.0\.0\.1:{port} \[")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)  # hard stop: closes every session now
            try:
                async with asyncio.timeout(2 * T):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.log is not None:
            await self.log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@asynccontextmanager
async def running_haproxy(
    frontend_port: int,
    servers: Sequence[tuple[int, ...]],
    tls: tuple[int, Sequence[int]] | None = None,
    web_port: int | None = None,
) -> AsyncIterator[HaproxyProcess]:
    """The loopback variant of deploy/haproxy.cfg in front of ``servers`` (chat port,
    health port[, web port]; ``tls`` and ``web_port``: see :func:`loopback_haproxy_config`),
    ready once every server has passed a health check; stopped on exit."""
    config = loopback_haproxy_config(
        HAPROXY_CFG.read_text(), frontend_port, servers, tls=tls, web_port=web_port
    )
    names = haproxy_servers(config)
    lb = HaproxyProcess(config, frontend_port, web_port)
    try:
        await lb.start(names)
        yield lb
    finally:
        await lb.stop()
